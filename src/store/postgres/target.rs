//! Which PostgreSQL database hookci uses (`database:` or `$HOOKCI_DATABASE_URL`), and
//! how that is shown in logs and errors: never with its password.

use std::str::FromStr;

/// A parsed database URL, with the password (from the URL, a file or systemd's
/// credentials) inside; `Debug` and [`PgTarget::shown`] leave the password out.
#[derive(Clone)]
pub struct PgTarget {
    pub(crate) config: tokio_postgres::Config,
    shown: String,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl PartialEq for PgTarget {
    fn eq(&self, other: &PgTarget) -> bool {
        self.shown == other.shown
    }
}

impl PgTarget {
    /// Parses `url` (`postgres://user@host:port/db`, or `key=value` pairs); a
    /// `password` given replaces one in the URL. The error never repeats the URL, which
    /// may hold a password.
    pub fn parse(url: &str, password: Option<&str>) -> Result<PgTarget, String> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err("database: expected a postgres:// URL".into());
        }
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| format!("database: not a usable postgres:// URL: {e}"))?;
        if config.get_dbname().is_none() {
            return Err(
                "database: the URL names no database (postgres://USER@HOST/DATABASE)".into(),
            );
        }
        if config.get_user().is_none() {
            return Err("database: the URL names no user (postgres://USER@HOST/DATABASE)".into());
        }
        if let Some(password) = password {
            config.password(password);
        }
        config.application_name("hookci");
        let shown = show(&config);
        Ok(PgTarget { config, shown })
    }

    /// `postgres://user@host:port/db`: what logs and errors say.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// The same server and credentials, another database (the tests' fresh ones).
    pub fn with_dbname(&self, dbname: &str) -> PgTarget {
        let mut config = self.config.clone();
        config.dbname(dbname);
        PgTarget {
            shown: show(&config),
            config,
        }
    }

    /// The same server and database, as another user.
    pub fn with_user(&self, user: &str, password: &str) -> PgTarget {
        let mut config = self.config.clone();
        config.user(user);
        config.password(password);
        PgTarget {
            shown: show(&config),
            config,
        }
    }
}

fn show(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let name = match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            match config.get_ports().get(i).or(config.get_ports().first()) {
                Some(port) => format!("{name}:{port}"),
                None => name,
            }
        })
        .collect();
    format!(
        "postgres://{}@{}/{}",
        config.get_user().unwrap_or_default(),
        hosts.join(","),
        config.get_dbname().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shown_url_never_holds_the_password() {
        for (url, file) in [
            ("postgres://ci:hunter2@db.example:5433/hookci", None),
            ("postgres://ci@db.example:5433/hookci", Some("hunter2")),
            ("postgres://ci:old@db.example:5433/hookci", Some("hunter2")),
        ] {
            let target = PgTarget::parse(url, file).unwrap();
            assert_eq!(target.shown(), "postgres://ci@db.example:5433/hookci");
            assert!(!format!("{target:?}").contains("hunter2"));
            assert_eq!(target.config.get_password(), Some(&b"hunter2"[..]));
        }
    }

    #[test]
    fn bad_urls_are_refused_without_repeating_them() {
        for url in [
            "mysql://ci:hunter2@db/hookci",
            "postgres://ci:hunter2@db:notaport/hookci",
            "postgres://db.example/hookci",
            "postgres://ci:hunter2@db.example",
        ] {
            let err = PgTarget::parse(url, None).unwrap_err();
            assert!(err.starts_with("database: "), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }
}
