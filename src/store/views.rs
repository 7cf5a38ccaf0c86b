//! Reads for the dashboard: the newest run of each branch or tag, and the last run
//! that ran to an end, which a badge shows.

use rusqlite::OptionalExtension;

use super::{run_from_row, Run, Sqlite, StoreError, RUN_COLUMNS};

impl Sqlite {
    /// The newest run of each (pipeline, ref), by pipeline then ref.
    pub fn latest_per_ref(&self) -> Result<Vec<Run>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE id IN \
                 (SELECT MAX(id) FROM runs GROUP BY pipeline, ref) ORDER BY pipeline, ref"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt.query_map([], run_from_row).map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// The newest run of `pipeline` that ran to an end (succeeded, failed, timed out or
    /// was canceled), on one of `refs` when any are given. A skipped run built nothing
    /// and an interrupted one runs again, so neither says how the code fares.
    pub fn last_finished(
        &self,
        pipeline: &str,
        refs: &[String],
    ) -> Result<Option<Run>, StoreError> {
        let mut sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE pipeline = ? \
             AND status IN ('succeeded', 'failed', 'timed_out', 'canceled')"
        );
        let mut values: Vec<rusqlite::types::Value> = vec![pipeline.to_owned().into()];
        if !refs.is_empty() {
            let marks = vec!["?"; refs.len()].join(", ");
            sql.push_str(&format!(" AND ref IN ({marks})"));
            values.extend(refs.iter().map(|r| r.clone().into()));
        }
        sql.push_str(" ORDER BY id DESC LIMIT 1");
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&sql).map_err(|e| self.err(e))?;
        stmt.query_row(rusqlite::params_from_iter(values), run_from_row)
            .optional()
            .map_err(|e| self.err(e))
    }
}
