//! Throwaway databases for tests and trials: each made empty on the server that
//! `$HOOKCI_TEST_DATABASE_URL` names (`scripts/test` starts one), and dropped again
//! when its handle is. Callable from any thread, inside a runtime or not.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio_postgres::NoTls;

use super::PgTarget;

/// The variable that names the server tests make their databases on.
pub const TEST_DATABASE_VAR: &str = "HOOKCI_TEST_DATABASE_URL";

/// A database made for one test, dropped (with any connection still open to it) when
/// this is dropped.
pub struct Scratch {
    admin: PgTarget,
    target: PgTarget,
    name: String,
}

impl Scratch {
    /// A new empty database on the server of `$HOOKCI_TEST_DATABASE_URL`; an error that
    /// says how to get one when the variable is unset.
    pub fn from_env() -> Result<Scratch, String> {
        let url = std::env::var(TEST_DATABASE_VAR).map_err(|_| {
            format!(
                "{TEST_DATABASE_VAR} is not set: the PostgreSQL tests need a server to make \
                 their databases on (scripts/test starts a throwaway one and sets it)"
            )
        })?;
        Scratch::create(&url)
    }

    /// A new empty database on the server of `admin_url`, whose user may create
    /// databases.
    pub fn create(admin_url: &str) -> Result<Scratch, String> {
        static MADE: AtomicU64 = AtomicU64::new(0);
        let admin = PgTarget::parse(admin_url, None)?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let name = format!(
            "hookci_test_{}_{}_{nanos}",
            std::process::id(),
            MADE.fetch_add(1, Ordering::Relaxed)
        );
        admin_sql(&admin, &format!("CREATE DATABASE {name}"))?;
        Ok(Scratch {
            target: admin.with_dbname(&name),
            admin,
            name,
        })
    }

    pub fn target(&self) -> &PgTarget {
        &self.target
    }

    /// The URL a daemon's config names it by: the server's, with this database.
    pub fn url(&self) -> String {
        self.target.shown().to_owned()
    }

    /// The password of the server's URL, if it had one (a daemon reads it from a file).
    pub fn password(&self) -> Option<String> {
        self.target
            .config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
    }

    /// How many rows `table` holds: for tests that check what no read shows.
    pub fn count_rows(&self, table: &str) -> Result<i64, String> {
        let sql = format!("SELECT COUNT(*) FROM {table}");
        on_own_runtime(&self.target, move |client| async move {
            client.query_one(&sql, &[]).await?.try_get(0)
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(e) = admin_sql(&self.admin, &sql) {
            tracing::warn!(database = %self.name, error = %e, "cannot drop a test database");
        }
    }
}

fn admin_sql(admin: &PgTarget, sql: &str) -> Result<(), String> {
    let sql = sql.to_owned();
    on_own_runtime(admin, move |client| async move {
        client.batch_execute(&sql).await
    })
}

/// Runs `f` with a connection to `target`, on a thread and runtime of its own: a
/// test's runtime, if any, is never blocked or entered.
fn on_own_runtime<T, F, Fut>(target: &PgTarget, f: F) -> Result<T, String>
where
    T: Send,
    F: FnOnce(tokio_postgres::Client) -> Fut + Send,
    Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
{
    let config = target.config.clone();
    let shown = target.shown().to_owned();
    std::thread::scope(|s| {
        s.spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime
                .block_on(async move {
                    let (client, connection) = config.connect(NoTls).await?;
                    let driver = tokio::spawn(connection);
                    let out = f(client).await;
                    let _ = driver.await;
                    out
                })
                .map_err(|e| format!("database {shown}: {e}"))
        })
        .join()
        .unwrap_or_else(|_| Err("the database helper thread panicked".into()))
    })
}
