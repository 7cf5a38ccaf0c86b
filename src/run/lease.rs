//! Leases on a store several instances share: every third of `lease` (sooner after a
//! failure), one write renews this instance's hold on the runs it executes (a run it executes but no
//! longer holds was taken over by another instance: it is stopped, and its end left to
//! that one); the runs of instances whose hold lapsed are recovered, and the cancels
//! other instances passed on for this one's runs are applied as local ones. An
//! instance that cannot renew fences itself: before its leases can lapse anywhere, it
//! stops the runs it executes, since another instance may soon run them again. A
//! store only this daemon writes has no leases: nothing runs then.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::run::scheduler::{blocking, Cancel};
use crate::state::AppState;
use crate::store::RunStatus;

/// Runs for the life of the daemon: a stop that waits `shutdown_grace` for its
/// running runs keeps holding them meanwhile. Renewals, the fence that watches them,
/// and recovery with cancels go on side by side: a database that hangs the pool's
/// statements delays neither the renewals, which have their own connection, nor the
/// fence.
pub async fn keep(state: Arc<AppState>) {
    if !state.store.shared() {
        return;
    }
    let (renewed, last_ok) = watch::channel(Instant::now());
    tokio::join!(
        renew_every(&state, renewed),
        fence(&state, last_ok),
        recover_every(&state)
    );
}

/// Whether an instance whose last successful renewal began at `last_ok` must stop its
/// runs at `now`: from two thirds of the lease on, the third left is for their steps to
/// stop before the lease lapses and another instance may run them again. The times are
/// a monotonic clock's, which no change of the wall clock moves.
pub fn must_fence(last_ok: Instant, now: Instant, lease: Duration) -> bool {
    now.saturating_duration_since(last_ok) >= fence_after(lease)
}

fn fence_after(lease: Duration) -> Duration {
    lease - lease / 3
}

/// When the renewal after one that began at `began` is due, the last successful one
/// having begun at `last_ok` (`began` itself when that one went through): a third of
/// the lease on after a success; soon after a failure, so that one transient error is
/// retried well before [`must_fence`] would stop the runs. Once the fence stands, at
/// the usual pace again: the runs are stopped already, and a struggling database is
/// not pressed harder. A time already past means at once.
pub fn next_renewal(last_ok: Instant, began: Instant, lease: Duration) -> Instant {
    if began <= last_ok || must_fence(last_ok, began, lease) {
        began + lease / 3
    } else {
        began + retry_after(lease)
    }
}

/// The wait before a failed renewal is tried again: a few tries fit before the fence,
/// and never more than ten a second.
fn retry_after(lease: Duration) -> Duration {
    (lease / 12).max(Duration::from_millis(100))
}

/// Renews every third of `lease`, sooner after a failure ([`next_renewal`]), and tells
/// `renewed` when each successful renewal began: the leases it set run from no
/// earlier than that.
async fn renew_every(state: &Arc<AppState>, renewed: watch::Sender<Instant>) {
    let mut last_ok = *renewed.borrow();
    loop {
        let lease = state.config().lease;
        state.store.set_lease(lease);
        let began = Instant::now();
        if renew(state).await {
            last_ok = began;
            renewed.send_replace(began);
        }
        tokio::time::sleep_until(next_renewal(last_ok, began, lease)).await;
    }
}

/// Whether the renewal went through.
async fn renew(state: &Arc<AppState>) -> bool {
    // Taken before the renewal: a run that ends meanwhile has its end decided, and
    // `lose` leaves it alone; one claimed meanwhile holds the lease of its claim.
    let executing = state.running.executing();
    let held = state.running.held();
    match blocking(&state.store, move |s| s.renew_leases(&held)).await {
        Ok(renewed) => {
            for id in executing {
                if renewed.binary_search(&id).is_err() && state.running.lose(id) {
                    tracing::warn!(
                        run = id,
                        "this instance's lease on the run lapsed and another instance took it over: stopping its steps"
                    );
                }
            }
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot renew the leases of the running runs");
            false
        }
    }
}

/// Stops the runs this instance executes whenever [`must_fence`] says so, and keeps
/// the scheduler from claiming more (`fenced`), until a renewal goes through again; a
/// run claimed just before is stopped too, at most a third of the lease after its
/// claim.
async fn fence(state: &Arc<AppState>, mut last_ok: watch::Receiver<Instant>) {
    loop {
        let last = *last_ok.borrow_and_update();
        let lease = state.config().lease;
        let now = Instant::now();
        let fenced = must_fence(last, now, lease);
        if state.fenced.swap(fenced, Ordering::Relaxed) != fenced {
            if fenced {
                tracing::error!(
                    ?lease,
                    "cannot renew this instance's leases: it claims no run until a renewal goes through"
                );
            } else {
                tracing::info!("this instance's leases are renewed again: it claims runs again");
            }
        }
        let wake = if fenced {
            let since = now.saturating_duration_since(last);
            for id in state.running.executing() {
                if state.running.lose(id) {
                    tracing::error!(
                        run = id,
                        since_last_renewal = ?since,
                        ?lease,
                        "cannot renew this instance's leases (the database is unreachable or does not answer): stopping the run's steps before its lease lapses, since another instance may then run it again; its end is left to whoever recovers it"
                    );
                }
            }
            now + lease / 3
        } else {
            last + fence_after(lease)
        };
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            changed = last_ok.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// Recovery every third of the lease; the cancels passed on at once, and with it.
async fn recover_every(state: &Arc<AppState>) {
    let cancels = state.store.cancel_wakeups();
    loop {
        let lease = state.config().lease;
        recover(state).await;
        apply_cancels(state).await;
        let next = tokio::time::sleep(lease / 3);
        let mut next = std::pin::pin!(next);
        loop {
            tokio::select! {
                () = &mut next => break,
                () = cancels.notified() => apply_cancels(state).await,
            }
        }
    }
}

async fn recover(state: &Arc<AppState>) {
    // Taken before the look: a run claimed after it holds the lease of its claim.
    let held = state.running.held();
    match blocking(&state.store, move |s| s.recover_expired(&held)).await {
        Ok(recovered) => {
            for r in &recovered {
                if r.status == RunStatus::Canceled {
                    tracing::info!(
                        run = r.run,
                        pipeline = %r.pipeline,
                        attempt = r.attempt,
                        "run of a lapsed lease canceled: a cancel was asked of it"
                    );
                } else {
                    tracing::warn!(
                        run = r.run,
                        attempt = r.attempt,
                        now = r.status.as_str(),
                        "recovered a run whose instance's lease lapsed"
                    );
                }
            }
            if recovered.iter().any(|r| r.status == RunStatus::Queued) {
                state.wake.notify_one();
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot recover the runs of lost instances"),
    }
}

async fn apply_cancels(state: &Arc<AppState>) {
    let asked = match blocking(&state.store, |s| s.cancel_requests()).await {
        Ok(asked) => asked,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the cancels other instances passed on");
            return;
        }
    };
    for (id, reason) in asked {
        // Not registered yet (claimed a moment ago): the next look applies it.
        if state.running.cancel(id, &reason) == Cancel::Stopping {
            tracing::debug!(run = id, reason = %reason, "cancel passed on by another instance");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The longest a renewal may take before it is given up, as the PostgreSQL store
    /// allows it (a sixth of the lease, at least 250 ms).
    fn longest_renewal(lease: Duration) -> Duration {
        (lease / 6).max(Duration::from_millis(250))
    }

    #[test]
    fn one_failed_renewal_followed_by_a_success_never_fences() {
        for lease in [1, 2, 3, 15, 60, 3600].map(Duration::from_secs) {
            let last_ok = Instant::now();
            let failed = next_renewal(last_ok, last_ok, lease);
            assert_eq!(failed, last_ok + lease / 3, "{lease:?}: the usual pace");
            // However long the failure took, up to the renewal's own limit.
            for took in [
                Duration::ZERO,
                Duration::from_millis(1),
                longest_renewal(lease),
            ] {
                let retry = next_renewal(last_ok, failed, lease).max(failed + took);
                assert!(retry > failed, "{lease:?}, failure took {took:?}");
                // The retry goes through: its answer comes within the renewal's limit
                // of a round trip, before the fence would act.
                assert!(
                    !must_fence(last_ok, retry, lease),
                    "{lease:?}, failure took {took:?}: the retry at {:?} comes after the fence",
                    retry - last_ok
                );
                assert_eq!(
                    next_renewal(retry, retry, lease),
                    retry + lease / 3,
                    "{lease:?}: the usual pace again"
                );
            }
        }
    }

    #[test]
    fn failed_renewals_are_retried_soon_until_the_fence_stands() {
        let lease = Duration::from_secs(12);
        let last_ok = Instant::now();
        let mut at = last_ok + lease / 3;
        let mut tries = 0;
        while !must_fence(last_ok, at, lease) {
            let next = next_renewal(last_ok, at, lease);
            assert_eq!(next - at, Duration::from_secs(1), "a twelfth of the lease");
            at = next;
            tries += 1;
        }
        assert_eq!(tries, 4, "tried again until two thirds of the lease");
        assert_eq!(next_renewal(last_ok, at, lease), at + lease / 3, "fenced");
        // Short leases retry no more than ten times a second.
        let short = Duration::from_secs(1);
        assert_eq!(
            next_renewal(last_ok, last_ok + short / 3, short) - (last_ok + short / 3),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn an_instance_fences_itself_from_two_thirds_of_the_lease_since_its_last_renewal() {
        let lease = Duration::from_secs(15);
        let last_ok = Instant::now();
        for (after, fenced) in [
            (Duration::ZERO, false),
            (Duration::from_secs(5), false),
            (Duration::from_millis(9_999), false),
            (Duration::from_secs(10), true),
            (Duration::from_secs(15), true),
            (Duration::from_secs(3600), true),
        ] {
            assert_eq!(
                must_fence(last_ok, last_ok + after, lease),
                fenced,
                "{after:?} after the last renewal"
            );
        }
        // A renewal that began after `now` was read (a race of two readers) fences
        // nothing.
        assert!(!must_fence(last_ok + lease, last_ok, lease));
        let short = Duration::from_secs(2);
        assert!(!must_fence(
            last_ok,
            last_ok + Duration::from_millis(1_333),
            short
        ));
        assert!(must_fence(
            last_ok,
            last_ok + Duration::from_millis(1_334),
            short
        ));
    }
}
