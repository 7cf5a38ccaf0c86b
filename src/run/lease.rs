//! Leases on a store several instances share: every third of `lease`, one write
//! renews this instance's hold on all its running runs (a run it executes but no
//! longer holds was taken over by another instance: it is stopped, and its end left to
//! that one), the runs of instances whose hold lapsed are recovered, and the cancels
//! other instances passed on for this one's runs are applied as local ones. A store
//! only this daemon writes has no leases: nothing runs then.

use std::sync::Arc;

use crate::run::scheduler::{blocking, Cancel};
use crate::state::AppState;
use crate::store::RunStatus;

/// Runs for the life of the daemon: a stop that waits `shutdown_grace` for its
/// running runs keeps holding them meanwhile.
pub async fn keep(state: Arc<AppState>) {
    if !state.store.shared() {
        return;
    }
    let cancels = state.store.cancel_wakeups();
    loop {
        let lease = state.config().lease;
        state.store.set_lease(lease);
        renew(&state).await;
        recover(&state).await;
        apply_cancels(&state).await;
        let next = tokio::time::sleep(lease / 3);
        let mut next = std::pin::pin!(next);
        loop {
            tokio::select! {
                () = &mut next => break,
                () = cancels.notified() => apply_cancels(&state).await,
            }
        }
    }
}

async fn renew(state: &Arc<AppState>) {
    // Taken before the renewal: a run that ends meanwhile has its end decided, and
    // `lose` leaves it alone.
    let executing = state.running.executing();
    match blocking(&state.store, |s| s.renew_leases()).await {
        Ok(held) => {
            for id in executing {
                if held.binary_search(&id).is_err() && state.running.lose(id) {
                    tracing::warn!(
                        run = id,
                        "this instance's lease on the run lapsed and another instance took it over: stopping its steps"
                    );
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot renew the leases of the running runs"),
    }
}

async fn recover(state: &Arc<AppState>) {
    match blocking(&state.store, |s| s.recover_expired()).await {
        Ok(recovered) => {
            for (id, attempt, status) in &recovered {
                tracing::warn!(
                    run = id,
                    attempt,
                    now = status.as_str(),
                    "recovered a run whose instance's lease lapsed"
                );
            }
            if recovered.iter().any(|(_, _, s)| *s == RunStatus::Queued) {
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
