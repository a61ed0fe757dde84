//! `ferry token …`: operator tokens with a role (reader < operator < contributor < admin).
//! A token is printed once, when it is made; the vault keeps only its hash. Other commands
//! use a token from `FERRY_TOKEN` instead of the admin token when it is set.
use std::process::ExitCode;

use clap::Subcommand;
use ferry::ctl::{Ctl, status_err};
use ferry::outln;
use ferry::output::{print_json, table, time};
use ferry_proto::registry::v1::{
    CreateTokenRequest, ListTokensRequest, RevokeTokenRequest, TokenInfo,
};
use serde_json::{Value, json};

use crate::OutputFormat;

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Make a token; it is shown once.
    Create {
        /// 1-64 letters, digits, '-', '_' or '.'.
        #[arg(long)]
        name: String,
        /// reader, operator, contributor or admin.
        #[arg(long)]
        role: String,
        /// Expire after this long (whole seconds, 60s to 3660d); never when left out.
        #[arg(long)]
        expires: Option<humantime::Duration>,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// The tokens by name, role and expiry (never the tokens).
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Refuse the token from now on (every component within a few seconds).
    Revoke {
        name: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

pub(crate) async fn run(c: &Ctl, cmd: &TokenCmd) -> anyhow::Result<ExitCode> {
    let mut registry = c.registry().await?;
    match cmd {
        TokenCmd::Create {
            name,
            role,
            expires,
            output,
        } => {
            let r = registry
                .create_token(CreateTokenRequest {
                    name: name.clone(),
                    role: role.clone(),
                    expires_in_seconds: expires_secs(*expires)?,
                })
                .await
                .map_err(|s| status_err("creating a token", s))?
                .into_inner();
            let info = r.info.unwrap_or_default();
            match output {
                OutputFormat::Json => {
                    let mut v = info_json(&info);
                    v["token"] = json!(r.token);
                    print_json(&v)?;
                }
                OutputFormat::Table => {
                    outln!(
                        "token {} ({}, expires {}); shown only now:\n{}",
                        info.name,
                        info.role,
                        expiry(&info),
                        r.token
                    );
                }
            }
        }
        TokenCmd::List { output } => {
            let tokens = registry
                .list_tokens(ListTokensRequest {})
                .await
                .map_err(|s| status_err("listing tokens", s))?
                .into_inner()
                .tokens;
            match output {
                OutputFormat::Json => {
                    print_json(&Value::Array(tokens.iter().map(info_json).collect()))?
                }
                OutputFormat::Table => {
                    let rows: Vec<Vec<String>> = tokens
                        .iter()
                        .map(|t| {
                            vec![
                                t.name.clone(),
                                t.role.clone(),
                                time(t.created_at_ms),
                                expiry(t),
                                if t.revoked { "revoked" } else { "in force" }.into(),
                            ]
                        })
                        .collect();
                    outln!(
                        "{}",
                        table(&["NAME", "ROLE", "CREATED", "EXPIRES", "STATUS"], &rows)
                    );
                }
            }
        }
        TokenCmd::Revoke { name, output } => {
            let t = registry
                .revoke_token(RevokeTokenRequest { name: name.clone() })
                .await
                .map_err(|s| status_err("revoking a token", s))?
                .into_inner();
            match output {
                OutputFormat::Json => print_json(&info_json(&t))?,
                OutputFormat::Table => outln!("token {} revoked", t.name),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The expiry asked for in seconds (0 = never); the registry refuses one out of its range.
fn expires_secs(d: Option<humantime::Duration>) -> anyhow::Result<u64> {
    let Some(d) = d else { return Ok(0) };
    let d = std::time::Duration::from(d);
    if d.subsec_nanos() != 0 || d.is_zero() {
        anyhow::bail!(
            "--expires {}: a token expires after whole seconds (60s to 3660d)",
            humantime::format_duration(d)
        );
    }
    Ok(d.as_secs())
}

fn expiry(t: &TokenInfo) -> String {
    if t.expires_at_ms == 0 {
        "never".into()
    } else {
        time(t.expires_at_ms)
    }
}

fn info_json(t: &TokenInfo) -> Value {
    json!({
        "name": t.name,
        "role": t.role,
        "created": time(t.created_at_ms),
        "expires": if t.expires_at_ms == 0 { Value::Null } else { json!(time(t.expires_at_ms)) },
        "expires_at_ms": t.expires_at_ms,
        "revoked": t.revoked,
    })
}
