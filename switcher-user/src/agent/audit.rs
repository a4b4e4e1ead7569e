//! The audit trail: who changed what, from what to what, and when, in a file that survives
//! log rotation, and in the journal.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

use crate::engine::Change;

/// Writes the audit trail of a change: who, what, from → to, when. The file is kept open, so
/// that writing a line never needs a new descriptor, and reopened when it was rotated; a line
/// that cannot be written is retried once on a fresh open, then logged as lost, with its text,
/// at error level.
pub(super) struct Audit {
    file: Option<PathBuf>,
    open: Mutex<Option<std::fs::File>>,
}

impl Audit {
    /// Opens `file` (if any) at once; a failure is logged, and each line tries again.
    pub fn new(file: Option<PathBuf>) -> Audit {
        let open = file.as_deref().and_then(|p| match open_audit(p) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::error!(
                    "audit log {}: {e}; audit lines go to the journal only until it can be opened",
                    p.display()
                );
                None
            }
        });
        Audit { file, open: Mutex::new(open) }
    }

    pub fn record(&self, who: &str, change: &Change) {
        tracing::info!(target: "audit", who, service = %change.service, what = %change.what, from = %change.from, to = %change.to, "change");
        if let Some(path) = &self.file {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let line = format!("{now} {who} {} {} {} -> {}\n", change.what, change.service, change.from, change.to);
            if let Err(e) = self.append(path, &line) {
                tracing::error!(
                    target: "audit",
                    line = line.trim_end(),
                    "audit line LOST from {}: {e}; this journal entry is its only record",
                    path.display()
                );
            }
        }
    }

    /// Appends one line to the held file, reopening it when it was rotated or on a write
    /// error (once).
    fn append(&self, path: &Path, line: &str) -> std::io::Result<()> {
        let mut held = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if held.as_ref().is_none_or(|f| rotated(path, f)) {
            match open_audit(path) {
                Ok(f) => *held = Some(f),
                // Rotated, and the new file cannot be opened: the held one still takes it.
                Err(_) if held.is_some() => {}
                Err(e) => return Err(e),
            }
        }
        let first = match held.as_mut() {
            Some(f) => f.write_all(line.as_bytes()),
            None => Err(std::io::Error::other("not open")),
        };
        if first.is_ok() {
            return Ok(());
        }
        let mut fresh = open_audit(path)?;
        fresh.write_all(line.as_bytes())?;
        *held = Some(fresh);
        Ok(())
    }
}

fn open_audit(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new().create(true).append(true).mode(0o640).open(path)
}

/// Whether `path` no longer names the held file (moved or removed by log rotation).
fn rotated(path: &Path, held: &std::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(path), held.metadata()) {
        (Ok(now), Ok(ours)) => now.dev() != ours.dev() || now.ino() != ours.ino(),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::temp_dir;

    fn change(what: &str) -> Change {
        Change { service: "web".into(), what: what.into(), from: "blue".into(), to: "green".into() }
    }

    #[test]
    fn the_audit_log_is_held_open_and_follows_rotation() {
        let dir = temp_dir("audit");
        let path = dir.join("audit.log");
        let audit = Audit::new(Some(path.clone()));
        assert!(path.exists(), "opened at start");
        audit.record("uid=0(root)", &change("cut-over"));
        // logrotate: move the file away; the next line goes to a new file.
        let old = dir.join("audit.log.1");
        std::fs::rename(&path, &old).expect("rotate");
        audit.record("uid=0(root)", &change("rollback"));
        let first = std::fs::read_to_string(&old).expect("rotated file");
        let second = std::fs::read_to_string(&path).expect("new file");
        assert!(first.contains("uid=0(root) cut-over web blue -> green") && !first.contains("rollback"), "{first}");
        assert!(second.contains("rollback web blue -> green"), "{second}");
        // Removed: the next line makes a new file.
        std::fs::remove_file(&path).expect("rm");
        audit.record("uid=0(root)", &change("weight"));
        let third = std::fs::read_to_string(&path).expect("recreated file");
        assert!(third.contains("weight web blue -> green"), "{third}");
        // And a path that cannot be opened at all is an error the caller logs as lost.
        let nowhere = Audit::new(Some(dir.join("missing-dir").join("audit.log")));
        assert!(nowhere.append(&dir.join("missing-dir").join("audit.log"), "x\n").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
