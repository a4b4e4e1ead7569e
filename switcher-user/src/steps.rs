//! A rollout's plan: its steps (shares of new flows for the new colour, and pauses between
//! them, each pause judged before the next share), the analysis's thresholds, the hooks run at
//! named points, and how long the old colour stays the backup. Parsed here from the words the
//! config file and `switcher rollout --steps` use (`"1%"`, `"pause 60s"`, `"100%"`); the engine
//! runs it (`engine::rollout`). Imports nothing of the crate.

use std::{fmt, time::Duration};

/// Steps in a plan at most.
pub const MAX_STEPS: usize = 20;
/// The longest pause a step may ask for.
pub const MAX_PAUSE: Duration = Duration::from_secs(7 * 86_400);
/// A share of all new flows, in basis points.
const ALL: u32 = 10_000;

/// One step of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this share (basis points) of new flows to the new colour.
    Share(u32),
    /// Hold the share this long, then judge the window: the next step comes only on a pass.
    Pause(Duration),
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Share(bp) => {
                let s = format!("{}.{:02}", bp / 100, bp % 100);
                write!(f, "{}%", s.trim_end_matches('0').trim_end_matches('.'))
            }
            Step::Pause(d) => write!(f, "pause {}", duration_words(*d)),
        }
    }
}

/// `60s` → `60s`, `300s` → `5m`, `7200s` → `2h`.
#[must_use]
pub fn duration_words(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => "0s".into(),
        s if s.is_multiple_of(3600) => format!("{}h", s / 3600),
        s if s.is_multiple_of(60) && s >= 120 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// What is wrong with a plan.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("step {index} {text:?}: {why}; a step is a share such as \"10%\" or a pause such as \"pause 60s\"")]
    Step { index: usize, text: String, why: &'static str },
    #[error("a plan needs steps, ending with \"100%\"")]
    Empty,
    #[error("{0} steps: a plan holds at most {MAX_STEPS}")]
    TooMany(usize),
    #[error("the plan starts with a pause: start with a share such as \"1%\"")]
    StartsWithPause,
    #[error("step {index} {text:?} is not more than the share before it: shares only grow")]
    NotGrowing { index: usize, text: String },
    #[error("the last share is {last}, not 100%: end the plan with \"100%\" (after it, `watch_secs` watches)")]
    NoFinal { last: String },
    #[error("a pause after \"100%\": nothing is judged there; use the rollout's `watch_secs` instead")]
    PauseAfterFinal,
}

/// Parses one step: `"12.5%"`, `"pause 60s"`, `"pause 5m"`, `"pause 1h"`.
///
/// # Errors
/// Why the text is not a step (`index` is 1-based, for the message).
pub fn parse_step(index: usize, text: &str) -> Result<Step, PlanError> {
    let bad = |why| PlanError::Step { index, text: text.to_owned(), why };
    let t = text.trim();
    if let Some(rest) = t.strip_prefix("pause") {
        let rest = rest.trim();
        let (num, unit) = rest.split_at(rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len()));
        let n: u64 = num.parse().map_err(|_| bad("a pause needs a whole number and a unit (s, m or h)"))?;
        let secs = match unit.trim() {
            "s" | "" => Some(n),
            "m" => n.checked_mul(60),
            "h" => n.checked_mul(3600),
            _ => return Err(bad("a pause's unit is s, m or h")),
        };
        let d = secs.map(Duration::from_secs).filter(|d| *d <= MAX_PAUSE && !d.is_zero());
        return d.map(Step::Pause).ok_or_else(|| bad("a pause lasts from 1s to 7 days"));
    }
    let pct = t.strip_suffix('%').ok_or_else(|| bad("a share ends with '%'"))?.trim();
    let (int, frac) = pct.split_once('.').unwrap_or((pct, ""));
    if int.is_empty() || frac.len() > 2 || !int.chars().chain(frac.chars()).all(|c| c.is_ascii_digit()) {
        return Err(bad("a share is a percentage with at most two decimals"));
    }
    let int: u32 = int.parse().map_err(|_| bad("a share is at most 100%"))?;
    let frac: u32 = format!("{frac:0<2}").parse().map_err(|_| bad("a share is a percentage"))?;
    let bp = int.checked_mul(100).and_then(|v| v.checked_add(frac)).filter(|&v| v <= ALL);
    match bp {
        Some(0) => Err(bad("a share of 0% sends nothing: leave it out")),
        Some(bp) => Ok(Step::Share(bp)),
        None => Err(bad("a share is at most 100%")),
    }
}

/// Parses and checks a plan: it starts with a share, shares grow, the last share is 100 %, and
/// nothing but shares and pauses comes before it.
///
/// # Errors
/// The first problem found.
pub fn parse_plan<S: AsRef<str>>(texts: &[S]) -> Result<Vec<Step>, PlanError> {
    let steps = texts.iter().enumerate().map(|(i, t)| parse_step(i + 1, t.as_ref())).collect::<Result<Vec<_>, _>>()?;
    check_plan(&steps)?;
    Ok(steps)
}

/// The checks of [`parse_plan`], on steps already parsed.
///
/// # Errors
/// The first problem found.
pub fn check_plan(steps: &[Step]) -> Result<(), PlanError> {
    if steps.is_empty() {
        return Err(PlanError::Empty);
    }
    if steps.len() > MAX_STEPS {
        return Err(PlanError::TooMany(steps.len()));
    }
    if matches!(steps[0], Step::Pause(_)) {
        return Err(PlanError::StartsWithPause);
    }
    let mut last = 0;
    for (i, s) in steps.iter().enumerate() {
        match *s {
            Step::Share(bp) if bp <= last => {
                return Err(PlanError::NotGrowing { index: i + 1, text: s.to_string() });
            }
            Step::Share(bp) => last = bp,
            Step::Pause(_) if last == ALL => return Err(PlanError::PauseAfterFinal),
            Step::Pause(_) => {}
        }
    }
    if last != ALL {
        return Err(PlanError::NoFinal { last: Step::Share(last).to_string() });
    }
    Ok(())
}

/// The plan a service gets without `steps` in its `[service.rollout]`:
/// `1% → pause 60s → 10% → pause 5m → 50% → pause 5m → 100%`.
#[must_use]
pub fn default_plan() -> Vec<Step> {
    let min = |m: u64| Step::Pause(Duration::from_secs(m * 60));
    vec![Step::Share(100), min(1), Step::Share(1_000), min(5), Step::Share(5_000), min(5), Step::Share(ALL)]
}

/// Where a hook runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HookPoint {
    /// Before the first share moves: a failure stops the rollout with nothing moved.
    BeforeFirstStep,
    /// Before the switch to 100 %: a failure aborts (new flows back to the old colour).
    BeforeFinal,
    /// After the switch to 100 %: a failure aborts (a rollback to the old colour).
    AfterFinal,
    /// After an abort (its exit status is only logged).
    OnAbort,
    /// When the old colour stops being the backup, `keep_previous_secs` after the end (its exit
    /// status is only logged).
    BackupReleased,
}

impl HookPoint {
    pub const ALL: [HookPoint; 5] = [
        HookPoint::BeforeFirstStep,
        HookPoint::BeforeFinal,
        HookPoint::AfterFinal,
        HookPoint::OnAbort,
        HookPoint::BackupReleased,
    ];

    /// The key in `[service.rollout.hooks]`, and `SWITCHER_HOOK`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            HookPoint::BeforeFirstStep => "before_first_step",
            HookPoint::BeforeFinal => "before_final",
            HookPoint::AfterFinal => "after_final",
            HookPoint::OnAbort => "on_abort",
            HookPoint::BackupReleased => "backup_released",
        }
    }

    /// Whether its exit status decides whether the rollout goes on.
    #[must_use]
    pub fn gates(self) -> bool {
        matches!(self, HookPoint::BeforeFirstStep | HookPoint::BeforeFinal | HookPoint::AfterFinal)
    }

    fn index(self) -> usize {
        match self {
            HookPoint::BeforeFirstStep => 0,
            HookPoint::BeforeFinal => 1,
            HookPoint::AfterFinal => 2,
            HookPoint::OnAbort => 3,
            HookPoint::BackupReleased => 4,
        }
    }
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Commands run by the daemon at named points of a rollout (`sh -c COMMAND`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hooks {
    commands: [Option<String>; 5],
    /// A hook still running after this long is killed and counts as failed.
    pub timeout: Duration,
}

impl Hooks {
    /// The default timeout of a hook.
    pub const TIMEOUT: Duration = Duration::from_secs(60);

    #[must_use]
    pub fn command(&self, point: HookPoint) -> Option<&str> {
        self.commands[point.index()].as_deref()
    }

    pub fn set(&mut self, point: HookPoint, command: Option<String>) {
        self.commands[point.index()] = command;
    }
}

/// A service's `[service.rollout]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolloutConfig {
    /// The plan `switcher rollout SERVICE COLOUR` runs unless `--steps` says otherwise.
    pub steps: Vec<Step>,
    /// After 100 %: this long, a new colour whose backends all fail their checks is rolled
    /// back and the rollout aborted.
    pub watch: Option<Duration>,
    /// New flows the new colour needs in a pause's window for a judgement; fewer: the step
    /// holds (inconclusive).
    pub min_flows: u64,
    /// The new colour fails a judgement when its replies per new flow fall below this share
    /// (percent) of the old colour's over the same window.
    pub min_reply_ratio_pct: u32,
    /// After a rollout completes, the old colour is shown as the backup this long.
    pub keep_previous: Option<Duration>,
    pub hooks: Hooks,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            steps: default_plan(),
            watch: None,
            min_flows: 20,
            min_reply_ratio_pct: 50,
            keep_previous: None,
            hooks: Hooks { timeout: Hooks::TIMEOUT, ..Hooks::default() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_parse_and_print_back() {
        assert_eq!(parse_step(1, "1%"), Ok(Step::Share(100)));
        assert_eq!(parse_step(1, " 12.5 % "), Ok(Step::Share(1_250)));
        assert_eq!(parse_step(1, "100%"), Ok(Step::Share(10_000)));
        assert_eq!(parse_step(1, "pause 60s"), Ok(Step::Pause(Duration::from_secs(60))));
        assert_eq!(parse_step(1, "pause 5m"), Ok(Step::Pause(Duration::from_secs(300))));
        assert_eq!(parse_step(1, "pause 2 h"), Ok(Step::Pause(Duration::from_secs(7_200))));
        assert_eq!(parse_step(1, "pause 1"), Ok(Step::Pause(Duration::from_secs(1))));
        for bad in ["0%", "100.01%", "5", "x%", "1.234%", "pause", "pause 0s", "pause 5d", "pause 8000000s", "-1%"] {
            let e = parse_step(3, bad).expect_err(bad).to_string();
            assert!(e.starts_with(&format!("step 3 {bad:?}")), "{e}");
        }
        for text in ["1%", "12.5%", "100%", "pause 60s", "pause 5m", "pause 1h", "pause 90s"] {
            assert_eq!(parse_step(1, text).expect(text).to_string(), text);
        }
    }

    #[test]
    fn plans_are_checked_whole() {
        let plan = parse_plan(&["1%", "pause 60s", "10%", "pause 5m", "50%", "pause 5m", "100%"]).expect("plan");
        assert_eq!(plan, default_plan());
        assert_eq!(parse_plan(&["100%"]), Ok(vec![Step::Share(10_000)]));
        assert_eq!(parse_plan::<&str>(&[]), Err(PlanError::Empty));
        assert_eq!(parse_plan(&["pause 1s", "100%"]), Err(PlanError::StartsWithPause));
        assert_eq!(
            parse_plan(&["10%", "pause 1s", "5%", "100%"]),
            Err(PlanError::NotGrowing { index: 3, text: "5%".into() })
        );
        assert_eq!(parse_plan(&["10%", "pause 1s", "50%"]), Err(PlanError::NoFinal { last: "50%".into() }));
        assert_eq!(parse_plan(&["10%", "100%", "pause 1s"]), Err(PlanError::PauseAfterFinal));
        let many: Vec<String> = (1..=21).map(|i| format!("{i}%")).collect();
        assert_eq!(parse_plan(&many), Err(PlanError::TooMany(21)));
        assert!(PlanError::NoFinal { last: "50%".into() }.to_string().contains("end the plan with \"100%\""));
    }
}
