//! Where a run's steps run. `workspace: fresh` (the default) gives each run its own
//! `state_dir/workspaces/RUN_ID`, removed when the run ends. `workspace: reuse` gives
//! each concurrency slot of a pipeline one workspace that outlives its runs, under
//! `state_dir/workspaces/reuse/PIPELINE/SLOT/N`:
//! - SLOT is `all` for `concurrency.group: pipeline` (one run of the pipeline at a
//!   time, whatever the ref), else the ref (`group: ref` and `none`), made one safe
//!   path segment;
//! - N is the lowest number no executing run holds, so runs that may overlap
//!   (`group: none`) never share a directory, and a slot's workspaces stay few.
//!
//! Leases are held in this process only: one daemon owns a state directory (its lock
//! file), and nothing executes before recovery is done. Changes of ownership for a
//! reused workspace belong in [`Lease`]'s preparation, the one place a run takes it.
//!
//! A reused workspace belongs to the steps' user between runs too, and its path can be
//! worked out: a step of another pipeline (the same `run_as` user) could plant a
//! poisoned build output in its `keep:` paths, for that pipeline's next run to use
//! with that pipeline's secrets. So the SLOT directory, the daemon's, lets that user
//! through (0711) only while a run of the slot has been handed one of its workspaces,
//! and is closed (0700) otherwise: while no run of it executes, and while an update
//! runs before the hand-over, unless another run of the same slot (`group: none`)
//! executes meanwhile.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::pipeline::{Group, Pipeline, Workspace};
use crate::store::Run;

/// The directory under `state_dir/workspaces/` that holds reused workspaces; never a
/// run id, so it cannot collide with a fresh workspace.
pub const REUSE_DIR: &str = "reuse";

/// The reused workspaces held by executing runs.
#[derive(Default)]
pub struct Slots {
    held: Arc<Mutex<Held>>,
}

/// The reused workspaces executing runs hold, and of those the ones handed to their
/// steps: a SLOT directory is open while one of its workspaces is handed.
#[derive(Default)]
struct Held {
    leased: HashSet<PathBuf>,
    handed: HashSet<PathBuf>,
}

/// A run's workspace. A reused one is held until the lease drops, after the run ended.
pub struct Lease {
    pub path: PathBuf,
    /// For `workspace: reuse`: the untracked paths an update keeps.
    pub reuse: Option<Vec<String>>,
    held: Option<Arc<Mutex<Held>>>,
}

impl Lease {
    /// A run's own workspace, removed when the run ends.
    pub fn fresh(path: PathBuf) -> Lease {
        Lease {
            path,
            reuse: None,
            held: None,
        }
    }

    /// Whether the workspace goes when the run ends.
    pub fn is_fresh(&self) -> bool {
        self.reuse.is_none()
    }

    /// What lets the steps' user through to a reused workspace, once it is handed to
    /// them (blocking: for the blocking pool); closed again when the last handed
    /// workspace of its slot is let go. A lease already let go opens nothing.
    pub fn slot_opener(&self) -> impl FnOnce() -> std::io::Result<()> + Send + 'static {
        let held = self.held.clone();
        let path = self.path.clone();
        move || {
            let (Some(held), Some(slot)) = (held, path.parent()) else {
                return Ok(());
            };
            let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
            if !held.leased.contains(&path) {
                return Ok(());
            }
            held.handed.insert(path.clone());
            set_mode(slot, OPEN)
        }
    }
}

/// The modes of a SLOT directory: passable but not listable, and closed.
const OPEN: u32 = 0o711;
const CLOSED: u32 = 0o700;

fn set_mode(dir: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(held) = &self.held {
            let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
            held.leased.remove(&self.path);
            held.handed.remove(&self.path);
            let Some(slot) = self.path.parent() else {
                return;
            };
            if held.handed.iter().all(|other| other.parent() != Some(slot)) {
                if let Err(e) = set_mode(slot, CLOSED) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(slot = %slot.display(), error = %e, "cannot close a reused workspace's slot to the steps' user");
                    }
                }
            }
        }
    }
}

impl Slots {
    /// The workspace `run` of `pipeline` executes in.
    pub fn lease(&self, state_dir: &Path, run: &Run, pipeline: &Pipeline) -> Lease {
        let workspaces = state_dir.join("workspaces");
        if pipeline.workspace == Workspace::Fresh {
            return Lease::fresh(workspaces.join(run.id.to_string()));
        }
        let slot = workspaces
            .join(REUSE_DIR)
            .join(&pipeline.name)
            .join(slot_name(pipeline.concurrency.group, &run.git_ref));
        self.hold(&slot, &pipeline.keep)
    }

    /// The lowest-numbered workspace of `slot` that no executing run holds.
    fn hold(&self, slot: &Path, keep: &[String]) -> Lease {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let path = (0u32..)
            .map(|n| slot.join(n.to_string()))
            .find(|p| !held.leased.contains(p))
            .unwrap_or_else(|| slot.join("0"));
        held.leased.insert(path.clone());
        Lease {
            path,
            reuse: Some(keep.to_vec()),
            held: Some(Arc::clone(&self.held)),
        }
    }
}

/// One safe path segment per slot: the ref's readable part, plus a digest of the whole
/// ref so that refs differing only in characters replaced here stay apart.
fn slot_name(group: Group, git_ref: &str) -> String {
    if group == Group::Pipeline {
        return "all".into();
    }
    let short = git_ref
        .strip_prefix("refs/heads/")
        .or_else(|| git_ref.strip_prefix("refs/tags/"))
        .unwrap_or(git_ref);
    let readable: String = short
        .chars()
        .take(60)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let digest = Sha256::digest(git_ref.as_bytes());
    let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("{readable}-{hex}")
}

/// Closes every SLOT directory under `workspaces/reuse` (a start: a crash left open
/// those its runs held).
pub fn close_slots(workspaces: &Path) {
    let list = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    for slot in list(&workspaces.join(REUSE_DIR))
        .iter()
        .flat_map(|pipeline| list(pipeline))
    {
        if let Err(e) = set_mode(&slot, CLOSED) {
            tracing::warn!(slot = %slot.display(), error = %e, "cannot close a reused workspace's slot to the steps' user");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_runs_of_a_slot_never_share_a_workspace() {
        let slots = Slots::default();
        let slot = Path::new("/s/workspaces/reuse/ci/main-0000");
        let keep = vec!["target/".to_owned()];
        let first = slots.hold(slot, &keep);
        let second = slots.hold(slot, &keep);
        assert_eq!(first.path, slot.join("0"));
        assert_eq!(second.path, slot.join("1"));
        assert_eq!(second.reuse.as_deref(), Some(&keep[..]));
        assert!(!first.is_fresh());
        drop(first);
        // Given back when its run ended: the next run takes the warm one again.
        assert_eq!(slots.hold(slot, &keep).path, slot.join("0"));
    }

    #[test]
    fn slot_names_are_one_safe_segment_and_keep_refs_apart() {
        let a = slot_name(Group::Ref, "refs/heads/feature/x");
        let b = slot_name(Group::Ref, "refs/heads/feature_x");
        assert!(a.starts_with("feature_x-") && b.starts_with("feature_x-"));
        assert_ne!(a, b);
        assert!(!slot_name(Group::None, "refs/heads/../../etc").contains('/'));
        assert_eq!(slot_name(Group::Pipeline, "refs/heads/main"), "all");
        assert_eq!(
            slot_name(Group::Ref, "refs/heads/main"),
            slot_name(Group::None, "refs/heads/main")
        );
    }
}
