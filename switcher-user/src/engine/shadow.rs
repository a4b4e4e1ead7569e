//! Shadow traffic: a service's share of new flows copied to the idle colour (the data path
//! does the copying; see `switcher-ebpf/src/shadow.rs`), and what `status` shows of it.

use switcher_common::{BP_ALL, user::Colour};

use super::{Change, Maps, Outcome, ServiceState, Switchboard, chain};
use crate::{
    config::{Mode, Protocol},
    protocol::{Response, ShadowColour, ShadowStatus},
    shadow::{DSR_REFUSAL, ShadowSetting, TCP_REFUSAL, share_words},
};

impl<M: Maps> Switchboard<M> {
    /// Sets a service's shadow share (0: off) and, if given, its ceiling. Refused for TCP and
    /// DSR services (the reason in one line), and when the TC program is not attached.
    pub(super) fn set_shadow(&mut self, name: &str, share_bp: u32, ceiling: Option<u32>) -> Outcome {
        let ceiling = self.check_shadow(name, share_bp, ceiling)?;
        let i = self.find(name)?;
        let s = &self.services[i];
        let before = s.config.shadow;
        self.maps.set_shadow(s.id, share_bp, ceiling).map_err(|e| chain(&e))?;
        self.services[i].config.shadow = ShadowSetting { share_bp, ceiling };
        let idle = self.services[i].active.other();
        let message = if share_bp == 0 {
            format!("{name}: shadow traffic off")
        } else {
            format!(
                "{name}: {} of new flows are also copied to the idle colour ({idle}), at most {ceiling} copies/s; its replies are dropped",
                share_words(share_bp)
            )
        };
        let change = Change {
            service: name.to_owned(),
            what: "shadow".into(),
            from: share_words(before.share_bp),
            to: share_words(share_bp),
        };
        Ok((Response { ok: true, message: Some(message), ..Response::default() }, Some(change)))
    }

    /// The fleet's shadow setting, applied on this node (nothing written when it has it).
    ///
    /// # Errors
    /// The setting is refused here (see [`Switchboard::check_shadow`]) or the map write failed.
    pub fn apply_shadow(&mut self, name: &str, share_bp: u32, ceiling: u32) -> Result<(), String> {
        let i = self.find(name)?;
        if self.services[i].config.shadow == (ShadowSetting { share_bp, ceiling }) {
            return Ok(());
        }
        self.set_shadow(name, share_bp, Some(ceiling)).map(|_| ())
    }

    /// Checks a shadow setting for `name`; returns the ceiling to use (the service's own when
    /// none is given).
    ///
    /// # Errors
    /// Why it is refused: TCP, DSR, more than 100 %, a ceiling of 0, no TC program.
    pub fn check_shadow(&self, name: &str, share_bp: u32, ceiling: Option<u32>) -> Result<u32, String> {
        let i = self.find(name)?;
        let s = &self.services[i];
        if share_bp > BP_ALL {
            return Err(format!("a shadow share is at most 100% ({share_bp} basis points asked)"));
        }
        if share_bp > 0 && s.config.protocol == Protocol::Tcp {
            return Err(format!("{name}: {TCP_REFUSAL}"));
        }
        if share_bp > 0 && s.config.mode == Mode::Dsr {
            return Err(format!("{name}: {DSR_REFUSAL}"));
        }
        let ceiling = ceiling.unwrap_or(s.config.shadow.ceiling);
        if ceiling == 0 {
            return Err("a ceiling of 0 copies per second copies nothing: use `switcher shadow SERVICE off`".into());
        }
        if share_bp > 0 && !self.maps.shadow_ready() {
            return Err(format!(
                "{name}: shadow traffic needs the TC program on every interface, and it is not attached (Linux 6.6 or later for TCX links; the daemon's log says why)"
            ));
        }
        Ok(ceiling)
    }

    /// The service's shadow traffic for `status`: when it is on, or copied anything.
    pub(super) fn shadow_status(&self, s: &ServiceState) -> Result<Option<ShadowStatus>, String> {
        let mut colours = Vec::with_capacity(2);
        for c in Colour::ALL {
            let n = self.maps.shadow_counters(s.id, c).map_err(|e| chain(&e))?;
            colours.push(ShadowColour {
                colour: c,
                shadowed: n.shadowed,
                sent: n.sent,
                over_ceiling: n.ceiling,
                failed: n.failed,
                replies_dropped: n.replies,
                latency_ns: n.latency_ns,
                latency_count: n.latency_count,
            });
        }
        let active = colours.iter().any(|c| c.shadowed + c.sent + c.over_ceiling + c.failed + c.replies_dropped > 0);
        let setting = s.config.shadow;
        Ok((setting.share_bp > 0 || active).then(|| ShadowStatus {
            share_bp: setting.share_bp,
            ceiling: setting.ceiling,
            target: s.active.other(),
            colours,
        }))
    }
}

#[cfg(test)]
mod tests {
    use crate::{
        engine::tests::board,
        protocol::{Request, Scope},
        shadow::TCP_REFUSAL,
    };

    fn shadow(service: &str, share_bp: u32) -> Request {
        Request::Shadow { service: service.into(), share_bp, ceiling: None, scope: Scope::default() }
    }

    #[test]
    fn tcp_is_refused_with_the_reason_and_off_is_fine() {
        let mut b = board();
        let r = b.handle(shadow("web", 1_000)).0;
        assert!(!r.ok);
        assert_eq!(r.error.as_deref(), Some(format!("web: {TCP_REFUSAL}").as_str()));
        let r = b.handle(shadow("web", 0)).0;
        assert!(r.ok, "turning shadow off is never refused: {r:?}");
    }

    #[test]
    fn a_udp_share_is_set_and_shown_towards_the_idle_colour() {
        let mut b = board();
        b.services[0].config.protocol = crate::config::Protocol::Udp;
        let (r, change) = b.handle(shadow("web", 1_000));
        assert!(r.ok, "{r:?}");
        assert_eq!(change.map(|c| (c.from, c.to)), Some(("off".to_owned(), "10%".to_owned())));
        let status = b.status(Some("web")).expect("status");
        let sh = status.services[0].shadow.as_ref().expect("shadow shown while on");
        assert_eq!((sh.share_bp, sh.target), (1_000, switcher_common::user::Colour::Green));
        assert!(!b.handle(shadow("web", 10_001)).0.ok, "more than 100 %");
    }

    #[test]
    fn a_reload_keeps_a_runtime_share_unless_the_file_changed_it() {
        let mut b = board();
        b.services[0].config.protocol = crate::config::Protocol::Udp;
        b.services[0].file_shadow = b.services[0].config.shadow;
        let mut file = b.services();
        assert!(b.handle(shadow("web", 5_000)).0.ok);
        // The same file: the runtime share stays, and the reload says so.
        let done = b.reload(file.clone()).expect("reloaded");
        assert_eq!(done.kept_shadow, ["web 50%"]);
        assert_eq!(b.services()[0].shadow.share_bp, 5_000, "a reload undid `switcher shadow`");
        let status = b.status(Some("web")).expect("status");
        assert_eq!(status.services[0].shadow.as_ref().map(|s| s.share_bp), Some(5_000));
        // Again: still kept (the file is still what it was).
        assert_eq!(b.reload(file.clone()).expect("reloaded").kept_shadow, ["web 50%"]);
        // A file that sets the service's shadow itself applies: the operator edited it.
        file[0].shadow.share_bp = 1_000;
        let done = b.reload(file.clone()).expect("reloaded");
        assert!(done.kept_shadow.is_empty());
        assert_eq!(b.services()[0].shadow.share_bp, 1_000);
        // And from then on the file's setting is the baseline: nothing runtime to keep.
        assert!(b.reload(file).expect("reloaded").kept_shadow.is_empty());
    }

    /// A share and ceiling set at runtime survive a reload of a file that did not change the
    /// service, as a pool changed at runtime does.
    #[test]
    fn a_runtime_share_survives_a_reload_that_did_not_change_the_service() {
        let mut b = board();
        b.services[0].config.protocol = crate::config::Protocol::Udp;
        let file = b.services();
        let (r, _) = b.handle(Request::Shadow {
            service: "web".into(),
            share_bp: 5_000,
            ceiling: Some(500),
            scope: Scope::default(),
        });
        assert!(r.ok, "{r:?}");
        b.reload(file).expect("the same file reloads");
        let status = b.status(Some("web")).expect("status");
        let sh = status.services[0].shadow.as_ref().map(|s| (s.share_bp, s.ceiling));
        assert_eq!(sh, Some((5_000, 500)), "the runtime share and ceiling after a reload of an unchanged file");
    }
}
