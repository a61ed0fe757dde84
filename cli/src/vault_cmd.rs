//! `ferry vault rotate-key` and `ferry vault keys`: the vault's data keys. A rotation adds a
//! key that seals every chunk stored from then on; older chunks keep the key that sealed them
//! and stay readable. Keys are never printed, only their ids.
use std::process::ExitCode;

use ferry::ctl::{Ctl, status_err};
use ferry::outln;
use ferry::output::{print_json, table, time};
use ferry_proto::registry::v1::{ListVaultKeysRequest, RotateVaultKeyRequest, VaultKeyInfo};
use serde_json::{Value, json};

use crate::OutputFormat;

pub(crate) async fn rotate(c: &Ctl, output: OutputFormat) -> anyhow::Result<ExitCode> {
    let k = c
        .registry()
        .await?
        .rotate_vault_key(RotateVaultKeyRequest {})
        .await
        .map_err(|s| status_err("rotating the vault key", s))?
        .into_inner();
    match output {
        OutputFormat::Json => print_json(&info_json(&k))?,
        OutputFormat::Table => outln!(
            "vault key {} made; chunks stored from now on are sealed with it (hosts and the storage-writer take it within a few seconds)",
            k.key_id
        ),
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn list(c: &Ctl, output: OutputFormat) -> anyhow::Result<ExitCode> {
    let keys = c
        .registry()
        .await?
        .list_vault_keys(ListVaultKeysRequest {})
        .await
        .map_err(|s| status_err("listing the vault keys", s))?
        .into_inner()
        .keys;
    match output {
        OutputFormat::Json => print_json(&Value::Array(keys.iter().map(info_json).collect()))?,
        OutputFormat::Table => {
            let rows: Vec<Vec<String>> = keys
                .iter()
                .map(|k| {
                    vec![
                        k.key_id.to_string(),
                        match k.created_at_ms {
                            0 => "with the vault".into(),
                            t => time(t),
                        },
                        if k.current { "yes" } else { "" }.into(),
                    ]
                })
                .collect();
            outln!("{}", table(&["key_id", "created", "current"], &rows));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn info_json(k: &VaultKeyInfo) -> Value {
    json!({
        "key_id": k.key_id,
        "created_at_ms": k.created_at_ms,
        "current": k.current,
    })
}
