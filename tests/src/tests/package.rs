//! The Debian package (`./x package`): lintian finds no error in it, `systemd-analyze verify`
//! finds its unit's commands, and installed into a throwaway root (`dpkg --root`, never this
//! machine's /) it puts every file where the README's "Installing the package" says, runs,
//! and a purge leaves nothing of it.
//!
//! The package is built from the binary the tests already use (`$SWITCHER_BIN`, the debug
//! build `./x test` made; stripped by the package step), not from a second, release build that
//! would cost CI minutes: what is checked here is the packaging, which is the same for both.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// What the package installs, as README "Installing the package" lists it: path and mode.
const FILES: [(&str, u32); 14] = [
    ("usr/bin/switcher", 0o755),
    ("usr/lib/systemd/system/switcher.service", 0o644),
    ("usr/lib/sysctl.d/60-switcher.conf", 0o644),
    ("etc/switcher/switcher.toml", 0o644),
    ("etc/logrotate.d/switcher", 0o644),
    ("usr/share/man/man1/switcher.1.gz", 0o644),
    ("usr/share/bash-completion/completions/switcher", 0o644),
    ("usr/share/zsh/vendor-completions/_switcher", 0o644),
    ("usr/share/fish/vendor_completions.d/switcher.fish", 0o644),
    ("usr/share/switcher/grafana/switcher.json", 0o644),
    ("usr/share/switcher/prometheus/switcher-alerts.yml", 0o644),
    ("usr/share/switcher/prometheus/switcher-alerts.test.yml", 0o644),
    ("usr/share/doc/switcher/copyright", 0o644),
    ("usr/share/doc/switcher/changelog.gz", 0o644),
];

/// The conffiles: kept by `dpkg --remove`, removed by `--purge`.
const CONFFILES: [&str; 2] = ["etc/switcher/switcher.toml", "etc/logrotate.d/switcher"];

/// A scratch directory, removed on drop (also when the test panics).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[track_caller]
fn ok(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| panic!("run {shown}: {e}"));
    assert!(out.status.success(), "{shown} failed ({}):\n{}", out.status, text(&out));
    text(&out)
}

/// `./x package --binary <the tests' binary>` into `out`; returns the .deb.
fn build_package(out: &Path) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf();
    ok(Command::new(cargo)
        .current_dir(&root)
        .args([
            "run",
            "--locked",
            "--quiet",
            "--package",
            "xtask",
            "--",
            "package",
            "--compression",
            "fast",
            "--binary",
        ])
        .arg(crate::proc::switcher_bin())
        .arg("--out")
        .arg(out));
    let debs: Vec<PathBuf> = std::fs::read_dir(out)
        .expect("the package directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "one .deb in {}: {debs:?}", out.display());
    debs[0].clone()
}

/// dpkg on the throwaway root: its own database, its log outside the root, maintainer scripts
/// run without chroot and with DPKG_ROOT set (they touch nothing outside the root then), and
/// libc6/libgcc-s1, which that empty database lacks, not asked for.
fn dpkg(root: &Path, log: &Path, args: &[&str]) -> String {
    ok(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .arg(format!("--log={}", log.display()))
        .args(["--force-script-chrootless", "--force-depends"])
        .args(args))
}

/// Every regular file and symlink under `root`, relative, dpkg's own database left out.
fn files(root: &Path) -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).expect("under the root").to_string_lossy().into_owned();
            if rel.starts_with("var/lib/dpkg") {
                continue;
            }
            match e.file_type() {
                Ok(t) if t.is_dir() => walk(&p, root, out),
                Ok(_) => out.push(rel),
                Err(_) => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

#[test]
fn the_debian_package_installs_runs_and_purges_in_a_throwaway_root() {
    const NAME: &str = "the_debian_package_installs_runs_and_purges_in_a_throwaway_root";
    if !crate::have_root(NAME) {
        return;
    }
    for (tool, pkg) in
        [("dpkg-deb", "dpkg"), ("dpkg-shlibdeps", "dpkg-dev"), ("lintian", "lintian"), ("strip", "binutils")]
    {
        if !have(tool) {
            crate::skip(
                NAME,
                &format!("{tool} is not installed (apt install {pkg}; ./x installs it when run as root)"),
            );
            return;
        }
    }
    let scratch = Scratch(std::env::temp_dir().join(format!("switcher-package-{}", crate::net::unique_prefix())));
    let out = scratch.0.join("out");
    let root = scratch.0.join("root");
    let log = scratch.0.join("dpkg.log");
    std::fs::create_dir_all(&out).expect("out dir");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        std::fs::create_dir_all(root.join(d)).expect("dpkg database dir");
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").expect("empty dpkg status");
    let deb = build_package(&out);

    // lintian: no error (warnings are printed for the reader, not failed on).
    let report = ok(Command::new("lintian").arg("--fail-on").arg("error").arg(&deb));
    assert!(!report.lines().any(|l| l.starts_with("E:")), "lintian errors:\n{report}");
    println!("lintian: {}", if report.contains(": ") { report.trim() } else { "clean" });

    let info = ok(Command::new("dpkg-deb").arg("--info").arg(&deb));
    for field in ["Package: switcher", "Depends: libc6 (>= ", "Section: net"] {
        assert!(info.contains(field), "no {field:?} in the control file:\n{info}");
    }

    dpkg(&root, &log, &["--install", &deb.to_string_lossy()]);
    for (path, mode) in FILES {
        let meta = std::fs::metadata(root.join(path)).unwrap_or_else(|e| panic!("{path} not installed: {e}"));
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "mode of {path}");
    }
    let conffiles = ok(Command::new("dpkg-query")
        .arg(format!("--admindir={}", root.join("var/lib/dpkg").display()))
        .args(["--showformat=${Conffiles}", "--show", "switcher"]));
    for c in CONFFILES {
        assert!(conffiles.contains(&format!("/{c} ")), "{c} is not a conffile: {conffiles}");
    }
    // Nothing else was installed than the list (and the unit's enablement, below).
    let installed = files(&root);
    let extra: Vec<&String> = installed
        .iter()
        .filter(|f| !FILES.iter().any(|(p, _)| p == f) && !f.contains("systemd/system/multi-user.target.wants"))
        .filter(|f| !f.starts_with("var/lib/systemd/deb-systemd-helper-enabled"))
        .collect();
    assert!(extra.is_empty(), "files the README does not list: {extra:?}");

    // Enabled (deb-systemd-helper, in the root) but not started: nothing runs it.
    let wants = root.join("etc/systemd/system/multi-user.target.wants/switcher.service");
    assert_eq!(
        std::fs::read_link(&wants).ok().as_deref(),
        Some(Path::new("/usr/lib/systemd/system/switcher.service")),
        "postinst enables the unit"
    );

    // The unit runs the binary where the package put it, and systemd agrees.
    let unit = std::fs::read_to_string(root.join("usr/lib/systemd/system/switcher.service")).expect("the unit");
    for line in unit.lines().filter(|l| l.starts_with("ExecStart")) {
        assert!(line.contains("=/usr/bin/switcher "), "{line}");
    }
    if have("systemd-analyze") {
        let out = Command::new("systemd-analyze")
            .arg(format!("--root={}", root.display()))
            .args(["verify", "--man=no", "/usr/lib/systemd/system/switcher.service"])
            .output()
            .expect("run systemd-analyze");
        // The throwaway root has no systemd units nor /bin/kill: those two complaints are the
        // root's, every other one would be the unit's.
        let complaints: Vec<String> = text(&out)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter(|l| {
                !l.contains("Unit sysinit.target not found") && !l.contains("Command /bin/kill is not executable")
            })
            .map(str::to_owned)
            .collect();
        assert!(complaints.is_empty(), "systemd-analyze verify:\n{}", complaints.join("\n"));
    } else {
        println!("systemd-analyze is not installed: the unit's paths were checked by reading it only");
    }

    let version = ok(Command::new(root.join("usr/bin/switcher")).arg("--version"));
    assert_eq!(version.trim(), format!("switcher {}", env!("CARGO_PKG_VERSION")));
    let check = ok(Command::new(root.join("usr/bin/switcher"))
        .args(["config", "check"])
        .arg(root.join("etc/switcher/switcher.toml")));
    assert!(check.contains(": ok"), "the shipped example config is valid: {check}");

    // What the daemon would have written: the audit log.
    std::fs::create_dir_all(root.join("var/log/switcher")).expect("log dir");
    std::fs::write(root.join("var/log/switcher/audit.log"), "1764091800 uid=0(root) cut-over web blue -> green\n")
        .expect("audit log");

    // remove: the program goes, configuration and logs stay.
    dpkg(&root, &log, &["--remove", "switcher"]);
    assert!(!root.join("usr/bin/switcher").exists(), "remove takes the binary");
    assert!(!root.join("usr/lib/systemd/system/switcher.service").exists(), "and the unit");
    for kept in CONFFILES.iter().chain(&["var/log/switcher/audit.log"]) {
        assert!(root.join(kept).exists(), "remove keeps {kept}");
    }

    // purge: nothing of switcher is left; what is left are directories other packages own.
    dpkg(&root, &log, &["--purge", "switcher"]);
    let left = files(&root);
    assert!(left.is_empty(), "files left after purge: {left:?}");
    for gone in ["etc/switcher", "var/log/switcher", "usr/share/switcher", "usr/share/doc/switcher"] {
        assert!(!root.join(gone).exists(), "{gone} left after purge");
    }
    let status = std::fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap_or_default();
    assert!(!status.contains("Package: switcher"), "dpkg still knows switcher after purge:\n{status}");
    drop(scratch);
}
