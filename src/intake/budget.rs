//! The budget of webhook body bytes held before their signature is checked
//! (`max_unverified_bytes`). A body takes its share as its bytes arrive, never from
//! what its Content-Length announces, so clients that announce large bodies and send
//! them slowly hold next to nothing. Each body may hold at most `max_body_bytes`
//! (intake refuses it past that), and large bodies (those that announce or reach more
//! than [`SMALL_BODY`]) together may hold only part of the budget: the rest is kept
//! for small ones, which real pushes are, so that large uploads, slow or fast, cannot
//! starve them.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A body is large once it holds more than this.
pub const SMALL_BODY: u64 = 1024 * 1024;

/// A share grows in steps this big, so that a trickle of small chunks does not take
/// the budget's lock for each one.
const STEP: u64 = 16 * 1024;

/// Permits are KiB.
const UNIT: u64 = 1024;

/// The budget is spent: the body is to be answered 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Spent {
    #[error(
        "too many webhook bodies are being received at once (max_unverified_bytes); retry later"
    )]
    All,
    #[error("too many large webhook bodies are being received at once (max_unverified_bytes keeps a part for small ones); retry later")]
    Large,
}

/// All of the budget, and the part of it large bodies may hold.
#[derive(Debug)]
pub struct BodyBudget {
    all: Arc<Semaphore>,
    large: Arc<Semaphore>,
}

impl BodyBudget {
    /// `budget` bytes in all (`max_unverified_bytes`, at least `max_body`); large bodies
    /// leave half of it to small ones, or what is left above one body of `max_body`
    /// bytes if that is less, so that the largest body always fits.
    pub fn new(budget: u64, max_body: u64) -> BodyBudget {
        let kept = (budget.saturating_sub(max_body)).min(budget / 2);
        BodyBudget {
            all: Arc::new(Semaphore::new(permits(budget))),
            large: Arc::new(Semaphore::new(permits(budget - kept))),
        }
    }

    /// An empty share, for one body that announced `announced` bytes: a body that
    /// announces a large one counts as large from its first byte.
    pub fn share(&self, announced: u64) -> Share {
        Share {
            all: Arc::clone(&self.all),
            large: Arc::clone(&self.large),
            held: None,
            held_large: None,
            units: 0,
            announced_large: announced > SMALL_BODY,
        }
    }

    /// What is not held now, in bytes (for tests and metrics).
    pub fn available(&self) -> u64 {
        self.all.available_permits() as u64 * UNIT
    }
}

fn permits(bytes: u64) -> usize {
    usize::try_from(bytes.div_ceil(UNIT))
        .unwrap_or(usize::MAX)
        .min(Semaphore::MAX_PERMITS)
}

/// One body's share of the budget, given back when dropped (once its signature is
/// checked, or it is refused).
#[derive(Debug)]
pub struct Share {
    all: Arc<Semaphore>,
    large: Arc<Semaphore>,
    held: Option<OwnedSemaphorePermit>,
    /// Once the body is large: all of its share again, from the large bodies' part.
    held_large: Option<OwnedSemaphorePermit>,
    units: u32,
    announced_large: bool,
}

impl Share {
    /// Grows the share to hold `bytes` (which the caller has received), up to `limit`,
    /// the most the body may be.
    pub fn hold(&mut self, bytes: u64, limit: u64) -> Result<(), Spent> {
        let want = bytes
            .div_ceil(STEP)
            .saturating_mul(STEP)
            .min(limit)
            .max(bytes);
        let units = u32::try_from(want.div_ceil(UNIT)).map_err(|_| Spent::All)?;
        if units <= self.units {
            return Ok(());
        }
        let more = Arc::clone(&self.all)
            .try_acquire_many_owned(units - self.units)
            .map_err(|_| Spent::All)?;
        if self.announced_large || u64::from(units) * UNIT > SMALL_BODY {
            let had = self.held_large.as_ref().map_or(0, |p| p.num_permits());
            let large = Arc::clone(&self.large)
                .try_acquire_many_owned(units - had as u32)
                .map_err(|_| Spent::Large)?;
            merge(&mut self.held_large, large);
        }
        merge(&mut self.held, more);
        self.units = units;
        Ok(())
    }
}

fn merge(held: &mut Option<OwnedSemaphorePermit>, more: OwnedSemaphorePermit) {
    match held {
        Some(p) => p.merge(more),
        None => *held = Some(more),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn a_share_holds_what_arrived_not_what_was_announced() {
        let budget = BodyBudget::new(4 * MIB, 2 * MIB);
        let mut shares: Vec<Share> = (0..100).map(|_| budget.share(0)).collect();
        for s in &mut shares {
            s.hold(100, 2 * MIB).unwrap();
        }
        // A step each: 100 bodies that sent 100 bytes hold 1.6 MiB of 4.
        assert_eq!(budget.available(), 4 * MIB - 100 * STEP);
        drop(shares);
        assert_eq!(budget.available(), 4 * MIB);
    }

    #[test]
    fn large_bodies_leave_a_part_of_the_budget_to_small_ones() {
        // 4 MiB, bodies up to 2 MiB: large ones may hold 2 MiB together.
        let budget = BodyBudget::new(4 * MIB, 2 * MIB);
        let mut first = budget.share(0);
        first.hold(MIB + MIB / 2, 2 * MIB).unwrap();
        let mut second = budget.share(0);
        second.hold(MIB, 2 * MIB).unwrap();
        assert_eq!(second.hold(MIB + MIB / 2 + 1, 2 * MIB), Err(Spent::Large));
        // What it held stays held until it is dropped; small bodies still find room.
        let mut small: Vec<Share> = (0..5).map(|_| budget.share(0)).collect();
        for s in &mut small {
            s.hold(100 * 1024, 2 * MIB).unwrap();
        }
        drop(first);
        let mut third = budget.share(0);
        third.hold(2 * MIB, 2 * MIB).unwrap();
    }

    #[test]
    fn a_body_announcing_a_large_one_counts_as_large_at_once() {
        let budget = BodyBudget::new(4 * MIB, 2 * MIB);
        let mut held: Vec<Share> = (0..2).map(|_| budget.share(2 * MIB)).collect();
        for s in &mut held {
            s.hold(MIB, 2 * MIB).unwrap();
        }
        let mut fourth = budget.share(2 * MIB);
        assert_eq!(fourth.hold(100, 2 * MIB), Err(Spent::Large));
        let mut small = budget.share(100 * 1024);
        small.hold(100 * 1024, 2 * MIB).unwrap();
    }

    #[test]
    fn the_largest_body_always_fits_an_empty_budget() {
        for (budget, max_body) in [(MIB, MIB), (65_000, 65_000), (3 * MIB, 2 * MIB)] {
            let b = BodyBudget::new(budget, max_body);
            let mut s = b.share(0);
            for got in (0..=max_body).step_by(7_777).chain([max_body]) {
                s.hold(got, max_body).unwrap();
            }
        }
    }

    #[test]
    fn a_spent_budget_refuses_and_a_dropped_share_gives_back() {
        let budget = BodyBudget::new(64 * 1024, 64 * 1024);
        let mut full = budget.share(0);
        full.hold(60_000, 64 * 1024).unwrap();
        let mut next = budget.share(0);
        assert_eq!(next.hold(10, 64 * 1024), Err(Spent::All));
        drop(full);
        next.hold(10, 64 * 1024).unwrap();
    }
}
