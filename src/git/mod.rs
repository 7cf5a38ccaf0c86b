//! The git stage: bare mirrors fetched incrementally and checkouts of one commit
//! (`checkout`; a fresh one's files written on several threads by `parallel`, a reused
//! one brought to the next commit in place by `update`), the paths a push changed
//! (`changes`), validated repository names that become paths (`repo`), and the child
//! process every git job runs in (`worker`). The daemon calls only `worker`; libgit2
//! runs in the child. Knows nothing of pipelines, runs or the store.

pub mod changes;
pub mod checkout;
pub mod parallel;
pub mod repo;
pub mod update;
pub mod worker;
