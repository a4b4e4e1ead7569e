//! Rollout hooks, run for the engine off its thread: `sh -c COMMAND` in a process group of its
//! own, with the rollout's environment (`SWITCHER_SERVICE`, `SWITCHER_FROM`, `SWITCHER_TO`,
//! `SWITCHER_STEP`, …), its output logged line by line, killed (the whole group) at its
//! timeout. The result goes back to the engine ([`crate::engine::Switchboard::hook_done`]),
//! which goes on or aborts.

use std::{
    io::{BufRead as _, BufReader, Read},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use super::{Engine, audit::Audit};
use crate::engine::{HookRun, RolloutEvents};

/// Lines of a hook's output logged at most (the rest is read and dropped).
const MAX_LINES: usize = 1_000;

/// Records the rollouts' changes and starts their hooks; each hook's result goes back to the
/// engine, and what that leads to comes back here.
pub(super) fn follow(engine: &Engine, audit: &Arc<Audit>, ev: RolloutEvents) {
    for c in &ev.changes {
        audit.record("rollout", c);
    }
    for hook in ev.hooks {
        let (engine, audit) = (engine.clone(), Arc::clone(audit));
        tokio::spawn(async move {
            let (service, token, point) = (hook.service.clone(), hook.token, hook.point);
            let result = tokio::task::spawn_blocking(move || run(&hook))
                .await
                .unwrap_or_else(|e| Err(format!("the hook's task failed: {e}")));
            match &result {
                Ok(()) => tracing::info!(%service, hook = %point, "hook succeeded"),
                Err(e) => tracing::warn!(%service, hook = %point, "hook failed: {e}"),
            }
            if let Ok(ev) = engine.call(move |b| b.hook_done(&service, token, result)).await {
                follow(&engine, &audit, ev);
            }
        });
    }
}

/// Runs one hook to its end or its timeout.
pub(super) fn run(h: &HookRun) -> Result<(), String> {
    use std::os::unix::process::CommandExt as _;
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(&h.command)
        .envs(h.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start `sh -c {:?}`: {e}", h.command))?;
    let (done, finished) = std::sync::mpsc::channel();
    let mut readers = 0;
    for (stream, out) in [
        (child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>), "stdout"),
        (child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>), "stderr"),
    ] {
        let Some(stream) = stream else { continue };
        let (service, hook, done) = (h.service.clone(), h.point, done.clone());
        readers += 1;
        let _ = std::thread::Builder::new().name("hook-output".into()).spawn(move || {
            for (n, line) in BufReader::new(stream).lines().map_while(Result::ok).enumerate() {
                if n < MAX_LINES {
                    tracing::info!(target: "hook", %service, %hook, stream = out, "{line}");
                }
            }
            let _ = done.send(());
        });
    }
    let deadline = Instant::now() + h.timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() >= deadline => {
                if let Ok(pgid) = i32::try_from(child.id()) {
                    // SAFETY: signalling the process group this hook's shell leads.
                    unsafe { libc::kill(-pgid, libc::SIGKILL) };
                }
                let _ = child.wait();
                break Err(format!("still running after {}s: killed", h.timeout.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => break Err(format!("waiting for it: {e}")),
        }
    };
    // Its output, as far as it came (a process it left behind may hold the pipes open).
    for _ in 0..readers {
        let _ = finished.recv_timeout(Duration::from_secs(1));
    }
    let status = status?;
    match (status.success(), status.code()) {
        (true, _) => Ok(()),
        (false, Some(code)) => Err(format!("exit status {code}")),
        (false, None) => Err(format!("ended by a signal ({status})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::HookPoint;

    fn hook(command: &str, timeout: Duration) -> HookRun {
        HookRun {
            service: "web".into(),
            point: HookPoint::BeforeFirstStep,
            command: command.into(),
            env: vec![("SWITCHER_TO".into(), "green".into())],
            timeout,
            token: 1,
        }
    }

    #[test]
    fn hooks_see_their_environment_and_their_exit_status_counts() {
        assert_eq!(run(&hook("test \"$SWITCHER_TO\" = green", Duration::from_secs(5))), Ok(()));
        assert_eq!(run(&hook("echo out; echo err >&2; exit 3", Duration::from_secs(5))), Err("exit status 3".into()));
        let started = Instant::now();
        let e = run(&hook("sleep 30 & sleep 30", Duration::from_millis(300))).expect_err("timed out");
        assert!(e.contains("killed"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10), "the group was killed, pipes and all");
    }
}
