//! Config layering: defaults → TOML file → FERRY_* environment → explicit overrides.

// `figment::Jail` closures must return `figment::Error`, which is large; not ours to shrink.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ferry_mesh::{Component, ConfigError, MeshConfig};
use figment::Jail;
use figment::providers::Serialized;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn toml_then_env_then_overrides() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        jail.create_file(
            "ferry.toml",
            r#"
                data_dir = "vault-dir"
                redis_url = "redis://127.0.0.1:7000"
                store_url = "file:///tmp/ferry-store"

                [registry]
                listen = "127.0.0.1:8001"

                [scheduler]
                listen = "127.0.0.1:8002"

                [vault]
                id = "from-toml"
                block_size = 65536

                [retry]
                time_unit = "5s"
            "#,
        )?;
        jail.set_env("FERRY_REDIS_URL", "redis://127.0.0.1:7100");
        jail.set_env("FERRY_SCHEDULER__LISTEN", "127.0.0.1:9002");
        jail.set_env("FERRY_RETRY_TIME_UNIT", "100ms");
        jail.set_env("FERRY_LOG", "debug");

        let cfg = MeshConfig::load(
            Some(Path::new("ferry.toml")),
            Serialized::default("ingest.listen", "127.0.0.1:9003"),
        )
        .map_err(|e| e.to_string())?;

        // TOML over defaults.
        assert_eq!(cfg.registry.listen, addr("127.0.0.1:8001"));
        assert_eq!(cfg.vault.id, "from-toml");
        assert_eq!(cfg.vault.block_size, 65536);
        assert_eq!(cfg.store_url, "file:///tmp/ferry-store");
        // Env over TOML.
        assert_eq!(cfg.redis_url, "redis://127.0.0.1:7100");
        assert_eq!(cfg.scheduler.listen, addr("127.0.0.1:9002"));
        assert_eq!(cfg.retry.time_unit, Duration::from_millis(100));
        // Overrides over everything; defaults where nobody spoke.
        assert_eq!(cfg.ingest.listen, addr("127.0.0.1:9003"));
        assert_eq!(cfg.failover.listen, addr("127.0.0.1:7405"));
        assert_eq!(cfg.endpoint(Component::Ingest), "https://127.0.0.1:9003");
        // Relative paths hang off the (absolute) data dir.
        assert!(cfg.data_dir.is_absolute() && cfg.data_dir.ends_with("vault-dir"));
        assert_eq!(cfg.tls.ca_cert, cfg.data_dir.join("pki/ca.pem"));
        assert_eq!(cfg.vault.admin_token_file, cfg.data_dir.join("admin.token"));

        Ok(())
    });
}

#[test]
fn nested_env_form_works() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        jail.set_env("FERRY_RETRY__TIME_UNIT", "250ms");
        jail.set_env("FERRY_STORE_URL", "az://container/prefix");
        jail.set_env("FERRY_VAULT__ID", "7");
        jail.set_env("FERRY_REDIS_URL", "redis://127.0.0.1:6390/0");
        let cfg = MeshConfig::load(None, figment::Figment::new()).map_err(|e| e.to_string())?;
        assert_eq!(cfg.retry.time_unit, Duration::from_millis(250));
        assert_eq!(cfg.store_url, "az://container/prefix");
        assert_eq!(cfg.vault.id, "7");
        Ok(())
    });
}

#[test]
fn written_toml_loads_back_identically() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        let mut cfg = MeshConfig::load(None, Serialized::default("data_dir", "d"))
            .map_err(|e| e.to_string())?;
        cfg.set_listen(Component::Gateway, addr("127.0.0.1:9999"));
        cfg.retry.time_unit = Duration::from_millis(20);
        cfg.write_toml(Path::new("out/ferry.toml"))
            .map_err(|e| e.to_string())?;
        let back = MeshConfig::load(Some(Path::new("out/ferry.toml")), figment::Figment::new())
            .map_err(|e| e.to_string())?;
        assert_eq!(back, cfg);
        Ok(())
    });
}

#[test]
fn errors_are_clear() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        let missing = MeshConfig::load(Some(Path::new("nope.toml")), figment::Figment::new());
        assert!(matches!(missing, Err(ConfigError::MissingFile(_))));

        jail.set_env("FERRY_VAULT__BLOCK_SIZE", "1000");
        let err = MeshConfig::load(None, figment::Figment::new()).unwrap_err();
        assert!(err.to_string().contains("vault.block_size"), "{err}");

        jail.set_env("FERRY_VAULT__BLOCK_SIZE", "4096");
        jail.set_env("FERRY_REGISTRY__LISTEN", "not an address");
        let err = MeshConfig::load(None, figment::Figment::new()).unwrap_err();
        assert!(matches!(err, ConfigError::Load(_)), "{err}");
        Ok(())
    });
}

#[test]
fn secrets_load_without_leaking() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        let cfg = MeshConfig::load(None, Serialized::default("data_dir", "d"))
            .map_err(|e| e.to_string())?;
        ferry_mesh::bootstrap_vault(&cfg, &[]).map_err(|e| e.to_string())?;
        let key = cfg.data_key().map_err(|e| e.to_string())?;
        assert_ne!(key, [0u8; 32]);
        let token = cfg.admin_token().map_err(|e| e.to_string())?;
        assert_eq!(token.len(), 64);
        // Running it again changes nothing.
        ferry_mesh::bootstrap_vault(&cfg, &[]).map_err(|e| e.to_string())?;
        assert_eq!(cfg.data_key().map_err(|e| e.to_string())?, key);

        std::fs::write(&cfg.vault.data_key_file, "short-secret-value").unwrap();
        let err = cfg.data_key().unwrap_err().to_string();
        assert!(!err.contains("short-secret-value"), "{err}");
        Ok(())
    });
}

#[test]
fn hand_built_config_resolves_paths_at_use() {
    let dir = tempfile::tempdir().unwrap();
    // Not passed through `load`/`finish`: paths stay relative in the struct.
    let cfg = MeshConfig {
        data_dir: dir.path().to_path_buf(),
        ..MeshConfig::default()
    };
    ferry_mesh::bootstrap_vault(&cfg, &["gw.example".into()]).unwrap();
    assert!(dir.path().join("pki/ca.pem").is_file());
    assert!(dir.path().join("admin.token").is_file());
    cfg.data_key().unwrap();
    cfg.admin_token().unwrap();
    ferry_mesh::ServerTls::load(&cfg).unwrap();
    ferry_mesh::ClientTls::service(&cfg).unwrap();
    ferry_mesh::load_ca(&cfg).unwrap();
}
