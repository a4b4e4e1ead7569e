//! The commands: thin wrappers over cargo with the right packages, profiles and environment.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

pub(crate) fn run(mut cmd: Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("run {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// The workspace root (xtask lives one level below it).
pub(crate) fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map_or(manifest.clone(), std::path::Path::to_path_buf)
}

pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

fn is_root() -> bool {
    std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

pub fn build(release: bool) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.current_dir(root()).args(["build", "--locked", "--package", "switcher-user"]);
    if release {
        cmd.arg("--release");
    }
    run(cmd)?;
    let profile = if release { "release" } else { "debug" };
    println!("built {}", target_dir().join(profile).join("switcher").display());
    Ok(())
}

pub fn test(args: &[String]) -> anyhow::Result<()> {
    // The integration tests run the real binary: build it first, in the same profile.
    build(false)?;
    if !is_root() {
        eprintln!("note: not root: the data-path and namespace tests will print why they skip");
    }
    // A skipped test returns early, which cargo counts as passed: each one appends its name
    // here (switcher_tests::skip), and the total counts them apart.
    let skipped_file = target_dir().join(format!("skipped-tests-{}.txt", std::process::id()));
    let _ = std::fs::remove_file(&skipped_file);
    let mut cmd = cargo();
    cmd.current_dir(root())
        .args(["test", "--locked", "--workspace", "--exclude", "switcher-ebpf"])
        .env("SWITCHER_BIN", target_dir().join("debug").join("switcher"))
        .env(SKIPPED_FILE_ENV, &skipped_file);
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    // Stream the output and add up cargo's per-binary "test result:" lines, so the run ends
    // with one total rather than the last binary's (often empty doc-test) count.
    let shown = format!("{cmd:?}");
    let mut child = cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("run {shown}"))?;
    let mut totals = Totals::default();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line.context("read cargo test output")?;
            println!("{line}");
            totals.add(&line);
        }
    }
    let status = child.wait().with_context(|| format!("wait for {shown}"))?;
    let skipped = std::fs::read_to_string(&skipped_file).unwrap_or_default();
    let _ = std::fs::remove_file(&skipped_file);
    println!("\n{}", totals.summary(&skipped));
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// Names the file where skipped tests record themselves (as in `switcher_tests::SKIPPED_FILE_ENV`).
const SKIPPED_FILE_ENV: &str = "SWITCHER_SKIPPED_FILE";

/// The totals of cargo's per-binary "test result:" lines.
#[derive(Debug, Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    fn add(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix("test result: ") {
            self.passed += count(rest, " passed");
            self.failed += count(rest, " failed");
            self.ignored += count(rest, " ignored");
        }
    }

    /// The last line of a run; `skipped` holds one skipped test's name a line. A skipped test
    /// passed in cargo's count and is moved from there to "skipped", with the names.
    fn summary(&self, skipped: &str) -> String {
        let mut names: Vec<&str> = skipped.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        names.sort_unstable();
        names.dedup();
        let skipped = names.len() as u64;
        let passed = self.passed.saturating_sub(skipped);
        let mut line = format!("tests: {passed} passed, {} failed, {skipped} skipped", self.failed);
        if self.ignored > 0 {
            line.push_str(&format!(", {} ignored", self.ignored));
        }
        if !names.is_empty() {
            line.push_str(&format!("\nskipped: {}", names.join(", ")));
        }
        line
    }
}

/// The number before `what` in a "test result:" line ("ok. 7 passed; 0 failed; …").
fn count(line: &str, what: &str) -> u64 {
    line.split(';')
        .find_map(|part| {
            part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(what.trim_start())
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

pub fn demo() -> anyhow::Result<()> {
    if !is_root() {
        bail!("the demo builds network namespaces and attaches XDP programs: run it as root (sudo ./x demo)");
    }
    build(false)?;
    let mut cmd = cargo();
    cmd.current_dir(root())
        .args(["run", "--locked", "--quiet", "--package", "switcher-tests", "--bin", "demo"])
        .env("SWITCHER_BIN", target_dir().join("debug").join("switcher"));
    run(cmd)
}

pub fn install(prefix: &std::path::Path, destdir: &std::path::Path) -> anyhow::Result<()> {
    build(true)?;
    let bin = target_dir().join("release").join("switcher");
    let under = |p: &std::path::Path| destdir.join(p.strip_prefix("/").unwrap_or(p));
    let prefix_arg = prefix;
    let prefix = under(prefix);
    let place = |from: &std::path::Path, to: &std::path::Path, mode: u32, replace: bool| -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        if to.exists() && !replace {
            println!("kept      {} (exists)", to.display());
            return Ok(());
        }
        std::fs::copy(from, to).with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
        println!("installed {}", to.display());
        Ok(())
    };
    let dist = root().join("dist");
    place(&bin, &prefix.join("bin/switcher"), 0o755, true)?;
    // The unit runs the binary from where it was installed (`prefix`/bin, as seen from the
    // installed system, not from `destdir`).
    let bindir = std::path::Path::new("/").join(prefix_arg).join("bin");
    let unit = under(std::path::Path::new("/etc/systemd/system/switcher.service"));
    if let Some(dir) = unit.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::write(&unit, crate::package::unit(&bindir)?).with_context(|| format!("write {}", unit.display()))?;
    println!("installed {} (runs {}/switcher)", unit.display(), bindir.display());
    place(&dist.join("60-switcher.conf"), &under(std::path::Path::new("/etc/sysctl.d/60-switcher.conf")), 0o644, true)?;
    // An operator's config is never overwritten.
    place(&dist.join("switcher.toml"), &under(std::path::Path::new("/etc/switcher/switcher.toml")), 0o640, false)?;
    let generated = |args: &[&str], to: std::path::PathBuf| -> anyhow::Result<()> {
        let out = Command::new(&bin).args(args).output().with_context(|| format!("run switcher {args:?}"))?;
        if !out.status.success() {
            bail!("switcher {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&to, out.stdout).with_context(|| format!("write {}", to.display()))?;
        println!("installed {}", to.display());
        Ok(())
    };
    generated(&["man"], prefix.join("share/man/man1/switcher.1"))?;
    generated(&["completions", "bash"], prefix.join("share/bash-completion/completions/switcher"))?;
    generated(&["completions", "zsh"], prefix.join("share/zsh/site-functions/_switcher"))?;
    generated(&["completions", "fish"], prefix.join("share/fish/vendor_completions.d/switcher.fish"))?;
    for (from, to) in [
        ("grafana/switcher.json", "share/switcher/grafana/switcher.json"),
        ("prometheus/switcher-alerts.yml", "share/switcher/prometheus/switcher-alerts.yml"),
    ] {
        place(&dist.join(from), &prefix.join(to), 0o644, true)?;
    }
    if destdir == std::path::Path::new("/") {
        let booted = std::path::Path::new("/run/systemd/system").exists();
        if booted {
            let _ = Command::new("systemctl").arg("daemon-reload").status();
            let _ = Command::new("sysctl").args(["--load", "/etc/sysctl.d/60-switcher.conf"]).status();
            println!("next: edit /etc/switcher/switcher.toml, then `systemctl enable --now switcher`");
        } else {
            println!("systemd is not running here: start the daemon with `switcher daemon`");
        }
    }
    Ok(())
}

pub fn soak(flips: u32) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the soak builds network namespaces and attaches XDP programs: run it as root (sudo ./x soak)");
    }
    build(false)?;
    let mut cmd = cargo();
    cmd.current_dir(root())
        .args(["run", "--locked", "--quiet", "--package", "switcher-tests", "--bin", "soak", "--", "--flips"])
        .arg(flips.to_string())
        .env("SWITCHER_BIN", target_dir().join("debug").join("switcher"));
    run(cmd)
}

pub fn bench(quick: bool, out: Option<&std::path::Path>) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the benchmarks load XDP programs and build namespaces: run them as root (sudo ./x bench)");
    }
    build(true)?;
    let mut cmd = cargo();
    cmd.current_dir(root())
        .args(["run", "--locked", "--quiet", "--release", "--package", "switcher-tests", "--bin", "bench", "--"])
        .env("SWITCHER_BIN", target_dir().join("release").join("switcher"));
    if quick {
        cmd.arg("--quick");
    }
    if let Some(dir) = out {
        cmd.arg("--out").arg(dir);
    }
    run(cmd)
}

/// CI's check that the benchmarks still run: `bench --quick` into a scratch directory, then a
/// look at what it wrote. No figure is judged: timing has no place in a pass/fail.
pub fn bench_smoke() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("switcher-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    println!("\nCI: `bench --quick` into {} to check that the benchmarks still run (no speed checks)", dir.display());
    let result = bench(true, Some(&dir)).and_then(|()| {
        let md = std::fs::read_to_string(dir.join("BENCHMARKS.md")).context("the bench wrote no BENCHMARKS.md")?;
        for section in [
            "## Per-packet cost",
            "## Scaling",
            "## Cut-over",
            "## Live-frame packet rate",
            "## Fleet at scale",
            "## Footprint",
        ] {
            if !md.contains(section) {
                bail!("BENCHMARKS.md from the smoke run has no {section:?} section");
            }
        }
        println!("bench smoke run: BENCHMARKS.md complete ({} bytes)", md.len());
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

pub fn lint() -> anyhow::Result<()> {
    let mut fmt = cargo();
    fmt.current_dir(root()).args(["fmt", "--all", "--check"]);
    run(fmt)?;
    let mut clippy = cargo();
    clippy.current_dir(root()).args([
        "clippy",
        "--locked",
        "--workspace",
        "--exclude",
        "switcher-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    run(clippy)
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_are_read_from_cargo_test_lines() {
        let line = "ok. 16 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s";
        assert_eq!(super::count(line, " passed"), 16);
        assert_eq!(super::count(line, " failed"), 2);
        assert_eq!(super::count(line, " ignored"), 1);
        assert_eq!(super::count("FAILED. 3 passed; 1 failed;", " passed"), 3);
    }

    #[test]
    fn skipped_tests_are_counted_as_skipped_not_passed() {
        let mut t = super::Totals::default();
        t.add("test result: ok. 16 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s");
        t.add("running 3 tests");
        t.add("test result: ok. 3 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s");
        assert_eq!(
            t.summary("metrics_are_served_on_loopback\nthe_hostile_packet_corpus\n"),
            "tests: 17 passed, 1 failed, 2 skipped\nskipped: metrics_are_served_on_loopback, the_hostile_packet_corpus"
        );
        assert_eq!(t.summary(""), "tests: 19 passed, 1 failed, 0 skipped");
    }
}
