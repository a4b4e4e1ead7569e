//! Where the data path lives on bpffs, so that it outlives the daemon.
//!
//! ```text
//! <root>/                 default /sys/fs/bpf/switcher (config `pin_path`)
//!   v<ABI_VERSION>/
//!     maps/<MAP NAME>     every map of the program (flows, state, counters, …)
//!     links/<ifname>      the XDP bpf_link of each interface
//!     overrides/<service> (fleet) an emergency change made `--local` while no daemon ran
//!     rollouts/<service>/<record>  a rollout's progress: a directory named by its record
//! ```
//!
//! A daemon that starts finds the maps and links of its ABI version and adopts them: the
//! program is replaced under the links atomically (`bpf_link_update`), flows and counters
//! carry on. Pins of another ABI version are refused with instructions, never reused.

use std::{
    io,
    path::{Path, PathBuf},
};

use switcher_common::ABI_VERSION;

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is normally mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Default root of switcher's pins.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/switcher";

/// Errors about the pin directories.
#[derive(Debug, thiserror::Error)]
pub enum PinsError {
    #[error("mount bpffs on {path}")]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{found} holds pins of another switcher version (ABI {version}, this is ABI {ABI_VERSION}); the data path they belong to may still be running. Run that version's `switcher uninstall`, or remove {found} to start afresh"
    )]
    OtherVersion { found: PathBuf, version: String },
    #[error("another switcher daemon holds the pins at {}; stop it first (one daemon per data path)", path.display())]
    Locked { path: PathBuf },
}

/// The pin layout under one root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Pins {
        Pins { root: root.into() }
    }

    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/v<ABI_VERSION>`.
    #[must_use]
    pub fn version_dir(&self) -> PathBuf {
        self.root.join(format!("v{ABI_VERSION}"))
    }

    #[must_use]
    pub fn maps_dir(&self) -> PathBuf {
        self.version_dir().join("maps")
    }

    #[must_use]
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    #[must_use]
    pub fn links_dir(&self) -> PathBuf {
        self.version_dir().join("links")
    }

    #[must_use]
    pub fn link(&self, iface: &str) -> PathBuf {
        self.links_dir().join(iface)
    }

    /// `<root>/v<ABI_VERSION>/tc_links`: the shadow program's TCX links, one per interface.
    #[must_use]
    pub fn tc_links_dir(&self) -> PathBuf {
        self.version_dir().join("tc_links")
    }

    #[must_use]
    pub fn tc_link(&self, iface: &str) -> PathBuf {
        self.tc_links_dir().join(iface)
    }

    /// Interfaces with a pinned TC link.
    #[must_use]
    pub fn tc_linked_interfaces(&self) -> Vec<String> {
        entries(&self.tc_links_dir())
    }

    /// `<root>/v<ABI_VERSION>/overrides`: one empty directory per service changed by the
    /// emergency path with `--local` in a fleet (bpffs holds directories, not files).
    #[must_use]
    pub fn overrides_dir(&self) -> PathBuf {
        self.version_dir().join("overrides")
    }

    /// Records that `service` was changed on this node only while no daemon ran.
    ///
    /// # Errors
    /// The directory could not be created.
    pub fn record_override(&self, service: &str) -> io::Result<()> {
        if service.is_empty() || service.contains('/') || service.starts_with('.') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("service name {service:?}")));
        }
        std::fs::create_dir_all(self.overrides_dir().join(service))
    }

    /// The services changed by the emergency path with `--local`, removing the records.
    #[must_use]
    pub fn take_overrides(&self) -> Vec<String> {
        let dir = self.overrides_dir();
        let names: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        for n in &names {
            let _ = std::fs::remove_dir(dir.join(n));
        }
        let _ = std::fs::remove_dir(&dir);
        names
    }

    /// `<root>/v<ABI_VERSION>/rollouts`: one directory per service with a rollout under way,
    /// holding one empty directory whose name is its record (bpffs holds directories and
    /// pinned objects only: no files, no symbolic links; a directory's rename is atomic).
    #[must_use]
    pub fn rollouts_dir(&self) -> PathBuf {
        self.version_dir().join("rollouts")
    }

    /// Saves a rollout's record for `service`, atomically: the directory named after the old
    /// record is renamed to the new one, so a reader (a restarted daemon) finds one or the
    /// other, never neither.
    ///
    /// # Errors
    /// A bad service name or record (up to 255 bytes, no `/`, not starting with `.`), or the
    /// directories could not be made or renamed.
    pub fn save_rollout(&self, service: &str, record: &str) -> io::Result<()> {
        if !plain_name(service) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("service name {service:?}")));
        }
        if !plain_name(record) || record.len() > 255 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a rollout record of 1 to 255 bytes without '/' ({} bytes)", record.len()),
            ));
        }
        let dir = self.rollouts_dir().join(service);
        std::fs::create_dir_all(&dir)?;
        let mut old: Vec<String> = entries(&dir);
        old.retain(|o| o != record);
        let Some(last) = old.pop() else {
            return match std::fs::create_dir(dir.join(record)) {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
                r => r,
            };
        };
        std::fs::rename(dir.join(&last), dir.join(record))?;
        // Left by nothing this code does; removed so that one record remains.
        for o in old {
            let _ = std::fs::remove_dir(dir.join(o));
        }
        Ok(())
    }

    /// Every saved rollout record, as `(service, record)`.
    #[must_use]
    pub fn rollouts(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = entries(&self.rollouts_dir())
            .into_iter()
            .filter_map(|service| {
                let record = entries(&self.rollouts_dir().join(&service)).into_iter().next()?;
                Some((service, record))
            })
            .collect();
        out.sort();
        out
    }

    /// Forgets `service`'s rollout record.
    pub fn clear_rollout(&self, service: &str) {
        if !plain_name(service) {
            return;
        }
        let dir = self.rollouts_dir().join(service);
        for e in entries(&dir) {
            let _ = std::fs::remove_dir(dir.join(e));
        }
        let _ = std::fs::remove_dir(&dir);
    }

    /// The process holding the pins' `flock` (a running daemon), from `/proc/locks`.
    #[must_use]
    pub fn holder(&self) -> Option<u32> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(&self.root).ok()?;
        let (dev, ino) = (meta.dev(), meta.ino());
        let (major, minor) = (((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff), (dev & 0xff) | ((dev >> 12) & !0xff));
        let wanted = format!("{major:02x}:{minor:02x}:{ino}");
        std::fs::read_to_string("/proc/locks").ok()?.lines().find_map(|l| {
            // `1: FLOCK  ADVISORY  WRITE 1234 00:2d:5678 0 EOF`; waiters are marked `->`.
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&wanted.as_str())).then(|| f.get(4)?.parse().ok())?
        })
    }

    /// Mounts bpffs where the root needs it (on `/sys/fs/bpf` for roots under it, else on the
    /// root itself) unless it is there already, then creates the directories.
    ///
    /// # Errors
    /// The mount or a directory creation failed.
    pub fn prepare(&self) -> Result<(), PinsError> {
        let mount_point = if self.root.starts_with(BPFFS) { PathBuf::from(BPFFS) } else { self.root.clone() };
        std::fs::create_dir_all(&mount_point)
            .map_err(|source| PinsError::Create { path: mount_point.clone(), source })?;
        if !is_bpffs(&mount_point) {
            mount_bpffs(&mount_point).map_err(|source| PinsError::Mount { path: mount_point.clone(), source })?;
            tracing::info!(path = %mount_point.display(), "mounted bpffs");
        }
        for dir in [self.maps_dir(), self.links_dir()] {
            std::fs::create_dir_all(&dir).map_err(|source| PinsError::Create { path: dir.clone(), source })?;
        }
        Ok(())
    }

    /// Takes the pins for this process: an exclusive `flock` on the root, held as long as the
    /// returned file is open, so two daemons never drive the same data path.
    ///
    /// # Errors
    /// [`PinsError::Locked`] when another process holds it.
    pub fn lock(&self) -> Result<std::fs::File, PinsError> {
        use std::os::fd::AsRawFd as _;
        let dir =
            std::fs::File::open(&self.root).map_err(|source| PinsError::Create { path: self.root.clone(), source })?;
        // SAFETY: flock on a descriptor we own.
        let rc = unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(PinsError::Locked { path: self.root.clone() });
        }
        Ok(dir)
    }

    /// Refuses when the root holds pins of another ABI version.
    ///
    /// # Errors
    /// [`PinsError::OtherVersion`] naming the directory.
    pub fn check_versions(&self) -> Result<(), PinsError> {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return Ok(()) };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(version) = name.strip_prefix('v')
                && version != ABI_VERSION.to_string()
                && version.chars().all(|c| c.is_ascii_digit())
                && has_entries(&entry.path().join("maps"))
            {
                return Err(PinsError::OtherVersion { found: entry.path(), version: version.to_owned() });
            }
        }
        Ok(())
    }

    /// Whether a data path of this version is pinned here.
    #[must_use]
    pub fn exists(&self) -> bool {
        has_entries(&self.maps_dir())
    }

    /// Interfaces with a pinned link.
    #[must_use]
    pub fn linked_interfaces(&self) -> Vec<String> {
        std::fs::read_dir(self.links_dir())
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }

    /// Detaches every pinned link at once (`BPF_LINK_DETACH`: releasing the last reference
    /// would detach later, from a kernel work queue), then removes every pin of this version
    /// and the directories; the maps are freed when no program uses them.
    ///
    /// # Errors
    /// A pin could not be removed.
    pub fn remove(&self) -> io::Result<()> {
        for iface in self.linked_interfaces() {
            if let Err(e) = detach_link(&self.link(&iface)) {
                tracing::warn!(interface = %iface, "detach the XDP link: {e}");
            }
        }
        for iface in self.tc_linked_interfaces() {
            if let Err(e) = detach_link(&self.tc_link(&iface)) {
                tracing::warn!(interface = %iface, "detach the TC link: {e}");
            }
        }
        let _ = self.take_overrides();
        for service in entries(&self.rollouts_dir()) {
            self.clear_rollout(&service);
        }
        let _ = std::fs::remove_dir(self.rollouts_dir());
        for dir in [self.links_dir(), self.tc_links_dir(), self.maps_dir()] {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    std::fs::remove_file(e.path())?;
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
        let _ = std::fs::remove_dir(self.version_dir());
        let _ = std::fs::remove_dir(&self.root);
        Ok(())
    }
}

/// A name that is one path component: not empty, no `/` or NUL, not starting with `.`.
fn plain_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '\0']) && !name.starts_with('.')
}

/// The names in a directory (none if it cannot be read).
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// `bpf(2)` with a zeroed 128-byte attribute block.
fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<libc::c_long> {
    // SAFETY: the attribute block is ours and as large as we say.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr)) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// What [`pin_by_id`] pins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Object {
    Map,
    Link,
}

/// Pins the map or link with kernel id `id` at `path` (`BPF_*_GET_FD_BY_ID`, `BPF_OBJ_PIN`),
/// through a descriptor of its own: the caller's descriptors are not touched, so a failure
/// never drops the object.
///
/// # Errors
/// The object is gone, or the pin could not be made.
pub fn pin_by_id(object: Object, id: u32, path: &Path) -> io::Result<()> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
    const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
    let cmd = match object {
        Object::Map => BPF_MAP_GET_FD_BY_ID,
        Object::Link => BPF_LINK_GET_FD_BY_ID,
    };
    let mut attr = [0u64; 16];
    attr[0] = u64::from(id);
    let fd = bpf(cmd, &mut attr)?;
    // SAFETY: a new fd the kernel just gave us; OwnedFd closes it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(i32::try_from(fd).map_err(io::Error::other)?) };
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64;
    attr[1] = u64::try_from(std::os::fd::AsRawFd::as_raw_fd(&fd)).map_err(io::Error::other)?;
    bpf(BPF_OBJ_PIN, &mut attr)?;
    Ok(())
}

/// Opens a pinned link and detaches it from its hook now.
pub fn detach_link(path: &Path) -> io::Result<()> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: a new fd the kernel just gave us; OwnedFd closes it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(i32::try_from(fd).map_err(io::Error::other)?) };
    let mut attr = [0u64; 16];
    attr[0] = u64::try_from(std::os::fd::AsRawFd::as_raw_fd(&fd)).map_err(io::Error::other)?;
    bpf(BPF_LINK_DETACH, &mut attr)?;
    Ok(())
}

fn has_entries(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

/// Whether `path` is on a bpffs.
#[must_use]
pub fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: a zeroed statfs is a valid out-buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a buffer we own.
    let rc = unsafe { libc::statfs(c.as_ptr(), &raw mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

fn mount_bpffs(path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let target = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_versioned() {
        let p = Pins::new("/sys/fs/bpf/switcher");
        assert_eq!(p.map("FLOWS"), PathBuf::from(format!("/sys/fs/bpf/switcher/v{ABI_VERSION}/maps/FLOWS")));
        assert_eq!(p.link("eth0"), PathBuf::from(format!("/sys/fs/bpf/switcher/v{ABI_VERSION}/links/eth0")));
    }

    #[test]
    fn other_versions_are_refused_with_instructions() {
        let dir = std::env::temp_dir().join(format!("switcher-pins-test-{}", std::process::id()));
        let old = dir.join("v1").join("maps");
        std::fs::create_dir_all(&old).expect("mkdir");
        std::fs::write(old.join("FLOWS"), b"").expect("file");
        let e = Pins::new(&dir).check_versions().expect_err("v1 pins");
        assert!(e.to_string().contains("ABI 1") && e.to_string().contains("switcher uninstall"), "{e}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
        assert!(Pins::new(&dir).check_versions().is_ok());
        assert!(!Pins::new(&dir).exists());
    }

    #[test]
    fn the_lock_holder_is_found_in_proc_locks() {
        let dir = std::env::temp_dir().join(format!("switcher-pins-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let pins = Pins::new(&dir);
        assert_eq!(pins.holder(), None, "nobody holds it yet");
        let lock = pins.lock().expect("lock");
        assert_eq!(pins.holder(), Some(std::process::id()));
        assert!(matches!(pins.lock(), Err(PinsError::Locked { .. })), "a second lock is refused");
        drop(lock);
        assert_eq!(pins.holder(), None);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn rollout_records_are_replaced_whole_and_read_back() {
        let root = std::env::temp_dir().join(format!("switcher-pins-rollouts-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let pins = Pins::new(&root);
        assert!(pins.rollouts().is_empty());
        pins.save_rollout("web", "1~blue~green~1").expect("save");
        pins.save_rollout("web", "1~blue~green~2").expect("replace");
        pins.save_rollout("web", "1~blue~green~2").expect("the same again");
        pins.save_rollout("api", "x").expect("save");
        assert_eq!(pins.rollouts(), [("api".into(), "x".into()), ("web".into(), "1~blue~green~2".into())]);
        assert!(pins.save_rollout("../etc", "x").is_err());
        assert!(pins.save_rollout("web", "").is_err());
        assert!(pins.save_rollout("web", "a/b").is_err());
        assert!(pins.save_rollout("web", &"x".repeat(256)).is_err());
        pins.clear_rollout("api");
        assert_eq!(pins.rollouts().len(), 1);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn local_overrides_are_recorded_and_taken_once() {
        let dir = std::env::temp_dir().join(format!("switcher-pins-over-{}", std::process::id()));
        let pins = Pins::new(&dir);
        pins.record_override("web").expect("record");
        assert!(pins.record_override("../etc").is_err());
        assert_eq!(pins.take_overrides(), ["web"]);
        assert!(pins.take_overrides().is_empty());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
