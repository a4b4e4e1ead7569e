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

fn run(mut cmd: Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("run {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// The workspace root (xtask lives one level below it).
fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map_or(manifest.clone(), std::path::Path::to_path_buf)
}

fn target_dir() -> PathBuf {
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
    let mut cmd = cargo();
    cmd.current_dir(root())
        .args(["test", "--locked", "--workspace", "--exclude", "switcher-ebpf"])
        .env("SWITCHER_BIN", target_dir().join("debug").join("switcher"));
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    // Stream the output and add up cargo's per-binary "test result:" lines, so the run ends
    // with one total rather than the last binary's (often empty doc-test) count.
    let shown = format!("{cmd:?}");
    let mut child = cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("run {shown}"))?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line.context("read cargo test output")?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                passed += count(rest, " passed");
                failed += count(rest, " failed");
                ignored += count(rest, " ignored");
            }
        }
    }
    let status = child.wait().with_context(|| format!("wait for {shown}"))?;
    println!("\ntests: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
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
}
