//! A pipeline's `notify:` targets: Slack, Discord or any JSON webhook, each with the
//! outcomes (`on:`) it is told of. Parsed and checked here; what they are sent and
//! when is `report`'s business.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

use crate::yaml::value_error;

/// One `notify:` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyTarget {
    pub kind: NotifyKind,
    pub on: Vec<NotifyOn>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyKind {
    /// The name of a secret holding the incoming-webhook URL.
    Slack { url_secret: String },
    /// The name of a secret holding the Discord webhook URL.
    Discord { url_secret: String },
    /// Any JSON receiver; `signing` names a secret that signs the body.
    Webhook {
        url: String,
        signing: Option<String>,
    },
}

impl NotifyKind {
    /// The secret names this target reads.
    pub fn secrets(&self) -> Vec<&str> {
        match self {
            NotifyKind::Slack { url_secret } | NotifyKind::Discord { url_secret } => {
                vec![url_secret]
            }
            NotifyKind::Webhook { signing, .. } => signing.iter().map(String::as_str).collect(),
        }
    }
}

/// An outcome a target is told of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyOn {
    Success,
    /// Failed or timed out.
    Failure,
    /// Succeeded after a failure of the same pipeline and ref.
    Fixed,
    Canceled,
    Always,
}

impl NotifyOn {
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyOn::Success => "success",
            NotifyOn::Failure => "failure",
            NotifyOn::Fixed => "fixed",
            NotifyOn::Canceled => "canceled",
            NotifyOn::Always => "always",
        }
    }
}

/// The outcomes a target is told of when its `on:` is not given.
pub const DEFAULT_ON: [NotifyOn; 2] = [NotifyOn::Failure, NotifyOn::Fixed];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    slack: Option<String>,
    discord: Option<String>,
    webhook: Option<String>,
    secret: Option<String>,
    on: Option<Vec<NotifyOn>>,
}

impl<'de> Deserialize<'de> for NotifyTarget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<NotifyTarget, D::Error> {
        let raw = RawTarget::deserialize(d)?;
        let kind = match (raw.slack, raw.discord, raw.webhook) {
            (Some(name), None, None) => NotifyKind::Slack { url_secret: name },
            (None, Some(name), None) => NotifyKind::Discord { url_secret: name },
            (None, None, Some(url)) => {
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    return Err(D::Error::custom(value_error(
                        &url,
                        format!("webhook {url:?} is not an http:// or https:// URL"),
                    )));
                }
                NotifyKind::Webhook {
                    url,
                    signing: raw.secret.clone(),
                }
            }
            (None, None, None) => {
                return Err(D::Error::custom(
                    "a target needs one of `slack`, `discord` or `webhook`",
                ))
            }
            _ => {
                return Err(D::Error::custom(
                    "a target has only one of `slack`, `discord` or `webhook`",
                ))
            }
        };
        let secrets = kind.secrets().into_iter().map(str::to_owned);
        for name in secrets.chain(raw.secret.clone()) {
            if !crate::pipeline::is_env_name(&name) {
                return Err(D::Error::custom(value_error(
                    &name,
                    format!("invalid secret name {name:?} (letters, digits and _)"),
                )));
            }
        }
        if raw.secret.is_some() && !matches!(kind, NotifyKind::Webhook { .. }) {
            return Err(D::Error::custom(
                "`secret` signs a webhook's body; Slack and Discord take none",
            ));
        }
        let on = match raw.on {
            Some(on) if on.is_empty() => {
                return Err(D::Error::custom(
                    "`on` names at least one of success, failure, fixed, canceled, always",
                ))
            }
            Some(on) => on,
            None => DEFAULT_ON.to_vec(),
        };
        Ok(NotifyTarget { kind, on })
    }
}
