//! The scheduler's heartbeat for the service manager: `WATCHDOG=1` at half the
//! watchdog interval systemd asked for (`WatchdogSec=`), sent from the scheduler's own
//! loop so that a scheduler stuck anywhere in it gets the service restarted, and a
//! `STATUS=` line kept current (runs running and queued, the last delivery). Reads the
//! store's counts; changes nothing.

use tokio::time::{Interval, MissedTickBehavior};

use crate::run::scheduler::blocking;
use crate::state::AppState;
use crate::store::RunStatus;
use crate::systemd;

pub struct Heartbeat {
    /// `None` without a watchdog: then it never ticks.
    interval: Option<Interval>,
    /// Whether a service manager listens at all; without one no status is computed.
    notifying: bool,
    /// The status line last sent, so an unchanged one is not sent again.
    last: String,
}

impl Heartbeat {
    pub fn new() -> Heartbeat {
        let interval = systemd::watchdog_interval().map(|every| {
            // Twice per interval, as sd_watchdog_enabled(3) advises: one late beat
            // must not cost a restart.
            let mut interval = tokio::time::interval(every / 2);
            interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
            interval
        });
        Heartbeat {
            interval,
            notifying: systemd::is_notifying(),
            last: String::new(),
        }
    }

    /// Whether a service manager hears the status line.
    pub fn is_notifying(&self) -> bool {
        self.notifying
    }

    /// Resolves when the next `WATCHDOG=1` is due; never without a watchdog.
    pub async fn tick(&mut self) {
        match &mut self.interval {
            Some(interval) => {
                interval.tick().await;
            }
            None => std::future::pending().await,
        }
    }

    /// Feeds the watchdog, then refreshes the status line.
    pub async fn beat(&mut self, state: &AppState) {
        systemd::notify("WATCHDOG=1");
        self.status(state).await;
    }

    /// Sends the status line if it changed.
    pub async fn status(&mut self, state: &AppState) {
        if !self.notifying {
            return;
        }
        let counts = match blocking(&state.store, |s| s.count_by_status()).await {
            Ok(counts) => counts,
            Err(e) => {
                tracing::warn!(error = %e, "cannot count runs for the service status");
                return;
            }
        };
        let count = |wanted| {
            counts
                .iter()
                .filter(|(status, _)| *status == wanted)
                .map(|(_, n)| *n)
                .sum::<i64>()
        };
        let last = *state
            .last_delivery
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let line = status_line(count(RunStatus::Running), count(RunStatus::Queued), last);
        if line != self.last {
            systemd::notify(&format!("STATUS={line}"));
            self.last = line;
        }
    }
}

impl Default for Heartbeat {
    fn default() -> Heartbeat {
        Heartbeat::new()
    }
}

/// The status `systemctl status hookci` shows.
fn status_line(running: i64, queued: i64, last_delivery: Option<i64>) -> String {
    let last = match last_delivery {
        Some(ms) => format!("last delivery {}", crate::clock::rfc3339(ms)),
        None => "no delivery since start".to_owned(),
    };
    format!("{running} running, {queued} queued; {last}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_names_counts_and_the_last_delivery() {
        assert_eq!(
            status_line(1, 3, Some(1_795_868_645_123)),
            "1 running, 3 queued; last delivery 2026-11-28T12:24:05.123Z"
        );
        assert_eq!(
            status_line(0, 0, None),
            "0 running, 0 queued; no delivery since start"
        );
    }
}
