//! Throwaway databases for tests and trials: each made empty on the server that
//! `$HOOKCI_TEST_DATABASE_URL` names (`scripts/test` starts one), and dropped again
//! when its handle is. Callable from any thread, inside a runtime or not. And a relay
//! in front of one that can go silent, for tests of a database that stops answering.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

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
    /// The roles made for this database's tests, dropped after it.
    roles: std::sync::Mutex<Vec<String>>,
}

/// A login role of a test's own on the test server (see [`Scratch::role`]).
pub struct ScratchRole {
    name: String,
    target: PgTarget,
    password: String,
}

impl ScratchRole {
    /// The URL a daemon connecting as this role names: its password apart.
    pub fn url(&self) -> String {
        self.target.shown().to_owned()
    }

    pub fn password(&self) -> &str {
        &self.password
    }
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
            roles: std::sync::Mutex::new(Vec::new()),
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
        self.number(&format!("SELECT COUNT(*) FROM {table}"))?
            .ok_or_else(|| format!("no count of {table}"))
    }

    /// The first column of the first row `sql` answers in this database (`None`: no
    /// row, or NULL): for tests that read what no API shows.
    pub fn number(&self, sql: &str) -> Result<Option<i64>, String> {
        let sql = sql.to_owned();
        on_own_runtime(&self.target, move |client| async move {
            match client.query_opt(&sql, &[]).await? {
                Some(row) => row.try_get(0),
                None => Ok(None),
            }
        })
    }

    /// Runs `sql` in this database as the server's user: for tests that put it in a
    /// state no hookci of today leaves it in.
    pub fn execute(&self, sql: &str) -> Result<(), String> {
        let sql = sql.to_owned();
        on_own_runtime(&self.target, move |client| async move {
            client.batch_execute(&sql).await
        })
    }

    /// Runs `sql` in this database in a transaction that stays open, its locks held,
    /// until the value returned is dropped.
    pub fn hold(&self, sql: &str) -> Result<Held, String> {
        let (config, shown, sql) = (
            self.target.config.clone(),
            self.target.shown().to_owned(),
            sql.to_owned(),
        );
        let (started_tx, started_rx) = std::sync::mpsc::sync_channel(1);
        let (release, released) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = started_tx.send(Err(e.to_string()));
                    return;
                }
            };
            let client = runtime.block_on(async move {
                let (client, connection) = config.connect(NoTls).await?;
                tokio::spawn(connection);
                client.batch_execute(&format!("BEGIN; {sql}")).await?;
                Ok::<_, tokio_postgres::Error>(client)
            });
            match client {
                Ok(client) => {
                    let _ = started_tx.send(Ok(()));
                    // The server holds the locks while the session lasts; closing it
                    // (the client dropped) rolls the transaction back.
                    let _ = released.recv();
                    drop(client);
                }
                Err(e) => {
                    let _ = started_tx.send(Err(format!("database {shown}: {e}")));
                }
            }
        });
        started_rx
            .recv()
            .map_err(|_| "the holding thread ended".to_owned())??;
        Ok(Held {
            release: Some(release),
            thread: Some(thread),
        })
    }

    /// A new login role that owns this database, for a daemon of its own to connect
    /// as (and migrate the database); dropped with the database.
    pub fn role(&self) -> Result<ScratchRole, String> {
        let mut random = [0u8; 8];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").map_err(|e| e.to_string())?,
            &mut random,
        )
        .map_err(|e| e.to_string())?;
        let password = hex::encode(random);
        let name = {
            let mut roles = self.roles.lock().unwrap_or_else(|e| e.into_inner());
            let name = format!("{}_role{}", self.name, roles.len());
            roles.push(name.clone());
            name
        };
        admin_sql(
            &self.admin,
            &format!(
                "CREATE ROLE {name} LOGIN PASSWORD '{password}'; ALTER DATABASE {} OWNER TO {name}",
                self.name
            ),
        )?;
        let target = self.target.with_user(&name, &password);
        Ok(ScratchRole {
            name,
            target,
            password,
        })
    }

    /// Cuts `role` off the server, as a lost network would: it may not log in any
    /// more, and its sessions are ended.
    pub fn lock_out(&self, role: &ScratchRole) -> Result<(), String> {
        admin_sql(
            &self.admin,
            &format!(
                "ALTER ROLE {name} NOLOGIN;
                 SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'",
                name = role.name
            ),
        )
    }
}

impl Scratch {
    /// Lets `role` log in again after [`Scratch::lock_out`], as a network come back.
    pub fn let_in(&self, role: &ScratchRole) -> Result<(), String> {
        admin_sql(&self.admin, &format!("ALTER ROLE {} LOGIN", role.name))
    }

    /// Ends the connection on which `role`'s instance renews its leases, and lets the
    /// role open no session more than it has left: that instance still claims and
    /// writes through its pool, but renews nothing.
    pub fn cut_renewals(&self, role: &ScratchRole) -> Result<(), String> {
        let name = &role.name;
        let renewer = super::lease::RENEWER_NAME;
        admin_sql(
            &self.admin,
            &format!(
                "DO $$ BEGIN
                   EXECUTE format('ALTER ROLE %I CONNECTION LIMIT %s', '{name}',
                     (SELECT GREATEST(count(*) - 1, 0) FROM pg_stat_activity WHERE usename = '{name}'));
                 END $$;
                 SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                  WHERE usename = '{name}' AND application_name = '{renewer}'"
            ),
        )
    }
}

/// An open transaction of [`Scratch::hold`]; dropping it ends the transaction.
pub struct Held {
    release: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.release.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(e) = admin_sql(&self.admin, &sql) {
            tracing::warn!(database = %self.name, error = %e, "cannot drop a test database");
        }
        for role in self.roles.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if let Err(e) = admin_sql(&self.admin, &format!("DROP ROLE IF EXISTS {role}")) {
                tracing::warn!(role, error = %e, "cannot drop a test role");
            }
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

/// A TCP relay in front of a test database that can go silent: from then on it passes
/// nothing on and holds every connection open, new ones too, as a database whose
/// packets are dropped looks to its clients.
pub struct Relay {
    target: PgTarget,
    password: Option<String>,
    silent: Arc<AtomicBool>,
}

impl Relay {
    /// Relays to `db`'s server, which must be reached over TCP.
    pub fn to(db: &Scratch) -> Relay {
        let config = &db.target.config;
        let host = match &config.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(host) => host.clone(),
            other => panic!("the test database is not reached over TCP: {other:?}"),
        };
        let upstream = (host, config.get_ports()[0]);
        let listener = TcpListener::bind("127.0.0.1:0").expect("a relay port");
        let port = listener.local_addr().expect("the relay's port").port();
        let silent = Arc::new(AtomicBool::new(false));
        let quiet = Arc::clone(&silent);
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let (quiet, upstream) = (Arc::clone(&quiet), upstream.clone());
                std::thread::spawn(move || serve(client, upstream, &quiet));
            }
        });
        let password = db.password();
        let url = format!(
            "postgres://{}@127.0.0.1:{port}/{}",
            config.get_user().unwrap_or_default(),
            config.get_dbname().unwrap_or_default()
        );
        let target = PgTarget::parse(&url, password.as_deref()).expect("the relay's URL");
        Relay {
            target,
            password,
            silent,
        }
    }

    /// `db` through the relay.
    pub fn target(&self) -> &PgTarget {
        &self.target
    }

    /// The URL a daemon's config names the relayed database by: its password apart.
    pub fn url(&self) -> String {
        self.target.shown().to_owned()
    }

    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// From now on nothing gets through, either way.
    pub fn silence(&self) {
        self.silent.store(true, Ordering::SeqCst);
    }
}

fn serve(client: TcpStream, upstream: (String, u16), quiet: &Arc<AtomicBool>) {
    let server = match quiet.load(Ordering::SeqCst) {
        true => None,
        false => TcpStream::connect(upstream).ok(),
    };
    if let Some(server) = &server {
        if let (Ok(from), Ok(to)) = (server.try_clone(), client.try_clone()) {
            let quiet = Arc::clone(quiet);
            std::thread::spawn(move || pass(from, Some(to), &quiet));
        }
    }
    pass(client, server, quiet);
}

/// Passes what `from` sends on to `to` until the relay goes silent; then reads and
/// drops it, until `from` closes.
fn pass(mut from: TcpStream, mut to: Option<TcpStream>, quiet: &AtomicBool) {
    let mut buf = [0u8; 8192];
    while let Ok(n @ 1..) = from.read(&mut buf) {
        if quiet.load(Ordering::SeqCst) {
            continue;
        }
        if let Some(to) = &mut to {
            if to.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    }
}
