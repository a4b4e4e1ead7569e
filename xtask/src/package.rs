//! `cargo xtask package`: a Debian package, built with `dpkg-deb` from a staged tree, and the
//! systemd unit that `install` and `package` both generate for the directory the binary goes to.
//!
//! Why `dpkg-deb` and not cargo-deb: the package holds more generated files than cargo-deb's
//! `assets` list describes well (the unit filled in for /usr/bin, the man page and completions
//! that the binary prints, the md5sums, `Depends` from `dpkg-shlibdeps`), and `dpkg-deb` is on
//! every Debian machine already, where cargo-deb is one more tool to download and build.

use std::{
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::cmd::{root, run, target_dir};

/// The package's name.
const NAME: &str = "switcher";

/// The systemd unit for a binary installed as `<bindir>/switcher`, from
/// `dist/switcher.service.in` (every `@BINDIR@` replaced).
///
/// # Errors
/// The template cannot be read, or `bindir` is not an absolute path.
pub fn unit(bindir: &Path) -> anyhow::Result<String> {
    if !bindir.is_absolute() {
        bail!("the unit needs an absolute binary directory, not {}", bindir.display());
    }
    let template = root().join("dist/switcher.service.in");
    let text = std::fs::read_to_string(&template).with_context(|| format!("read {}", template.display()))?;
    let bindir = bindir.to_str().context("the binary directory is not UTF-8")?;
    Ok(text.replace("@BINDIR@", bindir.trim_end_matches('/')))
}

/// How the package's data is compressed.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Compression {
    /// xz, as Debian's archive does (the default).
    Xz,
    /// gzip at level 1: a few times faster (the tests' throwaway packages).
    Fast,
}

/// What `./x package` was asked for.
#[derive(Debug)]
pub struct Options {
    /// A binary already built; `None`: build the release binary.
    pub binary: Option<PathBuf>,
    /// Where the .deb goes; `None`: `$CARGO_TARGET_DIR/debian/`.
    pub out: Option<PathBuf>,
    /// The Maintainer field.
    pub maintainer: String,
    pub compression: Compression,
}

/// A file of the package: where it goes and with which mode.
struct Entry<'a> {
    path: &'a str,
    mode: u32,
    contents: Contents,
}

enum Contents {
    /// A file of the repository (relative to its root).
    Repo(&'static str),
    /// Generated here.
    Bytes(Vec<u8>),
    /// The binary, stripped.
    Binary(PathBuf),
}

/// Builds the package; returns the .deb's path.
///
/// # Errors
/// A tool failed or is missing, or a file could not be staged.
pub fn package(opts: &Options) -> anyhow::Result<PathBuf> {
    for (tool, pkg) in [("dpkg-deb", "dpkg"), ("dpkg-shlibdeps", "dpkg-dev"), ("strip", "binutils")] {
        if which(tool).is_none() {
            bail!("{tool} is needed to build the package: apt install {pkg} (./x installs it when run as root)");
        }
    }
    let binary = match &opts.binary {
        Some(b) => b.clone(),
        None => {
            crate::cmd::build(true)?;
            target_dir().join("release").join("switcher")
        }
    };
    if !binary.is_file() {
        bail!("no binary at {}: build it first (./x build --release), or leave out --binary", binary.display());
    }
    let version = env!("CARGO_PKG_VERSION");
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?.trim().to_owned();
    let work = target_dir().join("debian").join(format!("{NAME}_{version}_{arch}"));
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("clear {}", work.display()))?;
    }
    let gen_ = |args: &[&str]| -> anyhow::Result<Vec<u8>> {
        let out = Command::new(&binary).args(args).output().with_context(|| format!("run switcher {args:?}"))?;
        if !out.status.success() {
            bail!("switcher {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(out.stdout)
    };
    let entries = [
        Entry { path: "usr/bin/switcher", mode: 0o755, contents: Contents::Binary(binary.clone()) },
        Entry {
            path: "usr/lib/systemd/system/switcher.service",
            mode: 0o644,
            contents: Contents::Bytes(unit(Path::new("/usr/bin"))?.into_bytes()),
        },
        Entry {
            path: "usr/lib/sysctl.d/60-switcher.conf",
            mode: 0o644,
            contents: Contents::Repo("dist/60-switcher.conf"),
        },
        // 0644 as lintian expects: the config holds no secrets.
        Entry { path: "etc/switcher/switcher.toml", mode: 0o644, contents: Contents::Repo("dist/switcher.toml") },
        Entry { path: "etc/logrotate.d/switcher", mode: 0o644, contents: Contents::Repo("dist/switcher.logrotate") },
        Entry {
            path: "usr/share/man/man1/switcher.1.gz",
            mode: 0o644,
            contents: Contents::Bytes(gzip(&gen_(&["man"])?)?),
        },
        Entry {
            path: "usr/share/bash-completion/completions/switcher",
            mode: 0o644,
            contents: Contents::Bytes(gen_(&["completions", "bash"])?),
        },
        Entry {
            path: "usr/share/zsh/vendor-completions/_switcher",
            mode: 0o644,
            contents: Contents::Bytes(gen_(&["completions", "zsh"])?),
        },
        Entry {
            path: "usr/share/fish/vendor_completions.d/switcher.fish",
            mode: 0o644,
            contents: Contents::Bytes(gen_(&["completions", "fish"])?),
        },
        Entry {
            path: "usr/share/switcher/grafana/switcher.json",
            mode: 0o644,
            contents: Contents::Repo("dist/grafana/switcher.json"),
        },
        Entry {
            path: "usr/share/switcher/prometheus/switcher-alerts.yml",
            mode: 0o644,
            contents: Contents::Repo("dist/prometheus/switcher-alerts.yml"),
        },
        Entry {
            path: "usr/share/switcher/prometheus/switcher-alerts.test.yml",
            mode: 0o644,
            contents: Contents::Repo("dist/prometheus/switcher-alerts.test.yml"),
        },
        Entry {
            path: "usr/share/doc/switcher/copyright",
            mode: 0o644,
            contents: Contents::Repo("dist/debian/copyright"),
        },
        Entry {
            path: "usr/share/doc/switcher/changelog.gz",
            mode: 0o644,
            contents: Contents::Bytes(gzip(changelog(version, &opts.maintainer).as_bytes())?),
        },
    ];
    let mut md5sums = String::new();
    for e in &entries {
        let to = work.join(e.path);
        let dir = to.parent().context("a staged file has a directory")?;
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        match &e.contents {
            Contents::Repo(from) => {
                std::fs::copy(root().join(from), &to).with_context(|| format!("copy {from} to {}", to.display()))?;
            }
            Contents::Bytes(bytes) => std::fs::write(&to, bytes).with_context(|| format!("write {}", to.display()))?,
            // As dh_strip does: no debug symbols, no .comment or .note sections.
            Contents::Binary(from) => {
                let mut strip = Command::new("strip");
                strip
                    .args(["--remove-section=.comment", "--remove-section=.note", "--strip-unneeded", "-o"])
                    .arg(&to)
                    .arg(from);
                run(strip)?;
            }
        }
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(e.mode))
            .with_context(|| format!("chmod {}", to.display()))?;
        if !e.path.starts_with("etc/") {
            let sum = output(Command::new("md5sum").arg(&to))?;
            let sum = sum.split_whitespace().next().context("md5sum printed nothing")?;
            md5sums.push_str(&format!("{sum}  {}\n", e.path));
        }
    }
    // Directories 0755 whatever the umask.
    set_dir_modes(&work)?;
    let depends = shlibs(&work.join("usr/bin/switcher"))?;
    let installed_kib = du_kib(&work)?;
    let control_dir = work.join("DEBIAN");
    std::fs::create_dir_all(&control_dir)?;
    let control = format!(
        "Package: {NAME}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: {maintainer}\n\
         Installed-Size: {installed_kib}\n\
         Depends: {depends}\n\
         Recommends: iproute2\n\
         Suggests: prometheus, grafana\n\
         Section: net\n\
         Priority: optional\n\
         Description: blue-green traffic switcher in the XDP hook\n \
         switcher moves a service's traffic between two pools of backends, blue and\n \
         green, with one map write in an XDP program: open connections keep their\n \
         backend, new ones go to the active colour. The daemon owns the maps, checks\n \
         backends' health, rolls back and fails over by itself, serves Prometheus\n \
         metrics, and in a fleet follows a desired state kept in etcd.\n \
         .\n \
         This package holds the switcher binary (daemon and CLI), its systemd unit,\n \
         the IP-forwarding sysctl settings, an example configuration, a logrotate\n \
         stanza for the audit log, and a Grafana dashboard and Prometheus alerting\n \
         rules under /usr/share/switcher.\n",
        maintainer = opts.maintainer,
    );
    std::fs::write(control_dir.join("control"), control)?;
    std::fs::write(control_dir.join("conffiles"), "/etc/switcher/switcher.toml\n/etc/logrotate.d/switcher\n")?;
    std::fs::write(control_dir.join("md5sums"), md5sums)?;
    for script in ["postinst", "prerm", "postrm"] {
        let to = control_dir.join(script);
        std::fs::copy(root().join("dist/debian").join(script), &to).with_context(|| format!("copy {script}"))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))?;
    }
    for f in ["control", "conffiles", "md5sums"] {
        std::fs::set_permissions(control_dir.join(f), std::fs::Permissions::from_mode(0o644))?;
    }
    std::fs::set_permissions(&control_dir, std::fs::Permissions::from_mode(0o755))?;
    let out_dir = opts.out.clone().unwrap_or_else(|| target_dir().join("debian"));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    let deb = out_dir.join(format!("{NAME}_{version}_{arch}.deb"));
    let mut build = Command::new("dpkg-deb");
    build.arg("--root-owner-group").arg("--build");
    match opts.compression {
        Compression::Xz => build.args(["-Zxz"]),
        Compression::Fast => build.args(["-Zgzip", "-z1"]),
    };
    build.arg(&work).arg(&deb);
    run(build)?;
    println!("built {}", deb.display());
    Ok(deb)
}

/// A native package's changelog: one entry for this version.
fn changelog(version: &str, maintainer: &str) -> String {
    let date = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| output(Command::new("date").args(["-R", "-u", "-d", &format!("@{s}")])).ok())
        .or_else(|| output(Command::new("date").arg("-R")).ok())
        .unwrap_or_default();
    format!(
        "{NAME} ({version}) unstable; urgency=medium\n\n  * Built by ./x package from the switcher repository.\n\n -- {maintainer}  {}\n",
        date.trim()
    )
}

/// `Depends` for the binary, from `dpkg-shlibdeps` (libc6, libgcc-s1 with their versions).
fn shlibs(binary: &Path) -> anyhow::Result<String> {
    // dpkg-shlibdeps reads debian/control from its working directory.
    let dir = target_dir().join("debian").join("shlibdeps");
    std::fs::create_dir_all(dir.join("debian"))?;
    std::fs::write(dir.join("debian/control"), format!("Source: {NAME}\n\nPackage: {NAME}\nArchitecture: any\n"))?;
    let text =
        output(Command::new("dpkg-shlibdeps").current_dir(&dir).arg("-O").arg(format!("-e{}", binary.display())))?;
    text.lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .map(str::to_owned)
        .context("dpkg-shlibdeps printed no shlibs:Depends line")
}

fn du_kib(dir: &Path) -> anyhow::Result<u64> {
    let text = output(Command::new("du").args(["-s", "--block-size=1024"]).arg(dir))?;
    text.split_whitespace().next().and_then(|n| n.parse().ok()).context("read du's output")
}

fn set_dir_modes(dir: &Path) -> anyhow::Result<()> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            set_dir_modes(&e.path())?;
        }
    }
    Ok(())
}

/// gzip -9n (no name, no time stamp), as Debian wants man pages and changelogs.
fn gzip(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut child = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("run gzip")?;
    let mut stdin = child.stdin.take().context("gzip's stdin")?;
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().context("wait for gzip")?;
    writer.join().map_err(|_| anyhow::anyhow!("the thread feeding gzip panicked"))?.context("feed gzip")?;
    if !out.status.success() {
        bail!("gzip failed ({})", out.status);
    }
    Ok(out.stdout)
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("run {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    String::from_utf8(out.stdout).with_context(|| format!("{shown} printed non-UTF-8"))
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(tool)).find(|p| p.is_file()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_unit_runs_the_binary_where_it_is_installed() {
        for bindir in ["/usr/bin", "/usr/local/bin", "/opt/switcher/bin/"] {
            let unit = super::unit(std::path::Path::new(bindir)).expect("unit");
            let want = format!("{}/switcher", bindir.trim_end_matches('/'));
            let exec: Vec<&str> = unit.lines().filter(|l| l.starts_with("ExecStart")).collect();
            assert_eq!(exec.len(), 2, "ExecStartPre and ExecStart:\n{unit}");
            for line in exec {
                let cmd = line.split_once('=').map(|(_, c)| c).unwrap_or_default();
                assert!(cmd.starts_with(&format!("{want} ")), "{line} does not run {want}");
            }
            assert!(!unit.contains("@BINDIR@"), "template left unfilled:\n{unit}");
        }
        assert!(super::unit(std::path::Path::new("bin")).is_err(), "a relative directory is refused");
    }
}
