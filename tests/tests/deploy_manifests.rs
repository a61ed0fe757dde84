//! Issue #15, deployment: `deploy/systemd` and `deploy/kubernetes` pass the checks of the
//! platforms they are for, and each check rejects a broken copy, so a pass means something.
//!
//! * `systemd-analyze verify` (Debian package systemd) over every unit. It refuses a unit
//!   whose ExecStart binary does not exist, and a build machine has nothing in
//!   /usr/local/bin, so it verifies copies pointed at the binaries built here
//!   (`cargo build --workspace --bins`).
//! * `kubernetes-validate --strict` (PyPI) over every manifest, against the schemas of
//!   Kubernetes 1.33 (nothing newer is needed: the probes are exec probes).
//!
//! A checker that is not installed fails the test, saying how to install it (deploy/test.sh
//! installs both). Also checked: the flags the units and containers pass are flags the
//! binaries take, the ConfigMap's ferry.toml is a valid mesh config, and no file holds a
//! secret (only REPLACE_ME where one goes).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_mesh::{Component, MeshConfig};

/// The Kubernetes version whose schemas the manifests are checked against.
const KUBERNETES: &str = "1.33.0";
/// The only value a secret has in these files.
const PLACEHOLDER: &str = "REPLACE_ME";
const INSTALL_SYSTEMD: &str = "apt-get install systemd";
const INSTALL_KUBERNETES_VALIDATE: &str = "python3 -m pip install kubernetes-validate";

/// `deploy/<sub>` of this repository (this crate is `tests/`).
fn deploy(sub: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the repository");
    root.join("deploy").join(sub)
}

/// Every file under `dir` (and its folders) whose name ends in one of `suffixes`, sorted.
fn files(dir: &Path, suffixes: &[&str]) -> Vec<PathBuf> {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut out = Vec::new();
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .path();
        if path.is_dir() {
            out.extend(files(&path, suffixes));
        } else if suffixes.iter().any(|s| path.to_string_lossy().ends_with(s)) {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn units() -> Vec<PathBuf> {
    files(&deploy("systemd"), &[".service", ".target"])
}

fn manifests() -> Vec<PathBuf> {
    files(&deploy("kubernetes"), &[".yaml", ".yml"])
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary folder")
}

/// A workspace binary, or a failure saying to build it.
fn bin(name: &str) -> PathBuf {
    ferry_tests::bin(name).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Runs a checker: whether it succeeded, and all it printed. One that is not installed fails
/// the test (a missing checker must never pass), saying how to install it.
fn run_checker(cmd: &mut Command, install: &str) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {:?} ({e}): install it with `{install}` (deploy/test.sh does)",
            cmd.get_program()
        )
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn systemd_verify(units: &[PathBuf]) -> (bool, String) {
    let mut cmd = Command::new("systemd-analyze");
    cmd.args(["verify", "--man=no"]).args(units);
    run_checker(&mut cmd, INSTALL_SYSTEMD)
}

fn kubernetes_validate(manifests: &[PathBuf]) -> (bool, String) {
    let mut cmd = Command::new("kubernetes-validate");
    // --quiet: nothing on success, so any output is a warning or a failure.
    cmd.args(["--strict", "--quiet", "-k", KUBERNETES])
        .args(manifests);
    run_checker(&mut cmd, INSTALL_KUBERNETES_VALIDATE)
}

/// A unit's text with its `/usr/local/bin/` commands pointed at the binaries built here.
fn with_built_binaries(unit: &str) -> String {
    let dir = bin("ferry-registry")
        .parent()
        .expect("a binary is in a folder")
        .to_path_buf();
    unit.replace("/usr/local/bin/", &format!("{}/", dir.display()))
}

#[test]
fn every_component_and_the_agent_have_a_unit() {
    let names: Vec<String> = units()
        .iter()
        .map(PathBuf::as_path)
        .map(file_name)
        .collect();
    let wanted = Component::ALL
        .iter()
        .map(|c| format!("{}.service", c.binary()))
        .chain(["ferry-agent.service", "ferry.target"].map(str::to_owned));
    for name in wanted {
        assert!(
            names.contains(&name),
            "{} has no {name}: {names:?}",
            deploy("systemd").display()
        );
    }
}

#[test]
fn systemd_units_pass_verify() {
    let dir = tempdir();
    let copies: Vec<PathBuf> = units()
        .iter()
        .map(|u| write(dir.path(), &file_name(u), &with_built_binaries(&read(u))))
        .collect();
    let (ok, out) = systemd_verify(&copies);
    // Name the real files, not the copies.
    let out = out.replace(
        &dir.path().display().to_string(),
        &deploy("systemd").display().to_string(),
    );
    // verify exits 0 after some problems ("Unknown key ..., ignoring"): any output fails.
    assert!(ok && out.trim().is_empty(), "systemd-analyze verify: {out}");
}

#[test]
fn systemd_verify_rejects_a_broken_unit() {
    let unit = deploy("systemd/ferry-registry.service");
    let good = with_built_binaries(&read(&unit));
    let exec = format!("ExecStart={}", bin("ferry-registry").display());
    let breaks = [
        // A bad value and an unknown key: verify says "ignoring" and exits 0.
        ("ProtectSystem=strict", "ProtectSystem=strikt".to_owned()),
        ("ProtectSystem=strict", "ProtectSytem=strict".to_owned()),
        // A command that does not exist: exit 1.
        (
            exec.as_str(),
            "ExecStart=/nonexistent/ferry-registry".to_owned(),
        ),
    ];
    for (from, to) in breaks {
        assert!(good.contains(from), "{}: no {from:?}", unit.display());
        let dir = tempdir();
        let copy = write(
            dir.path(),
            "ferry-registry.service",
            &good.replacen(from, &to, 1),
        );
        let (ok, out) = systemd_verify(&[copy]);
        assert!(
            out.contains("ferry-registry.service"),
            "systemd-analyze verify found nothing wrong with {to:?} in {} (exit ok: {ok}): {out}",
            unit.display()
        );
    }
}

#[test]
fn sysusers_file_creates_the_ferry_user() {
    let root = tempdir();
    let conf = root.path().join("etc/sysusers.d");
    std::fs::create_dir_all(&conf).unwrap_or_else(|e| panic!("{}: {e}", conf.display()));
    let file = deploy("systemd/ferry.sysusers");
    write(&conf, "ferry.conf", &read(&file));
    let mut cmd = Command::new("systemd-sysusers");
    cmd.arg(format!("--root={}", root.path().display()));
    let (ok, out) = run_checker(&mut cmd, INSTALL_SYSTEMD);
    let passwd = read(&root.path().join("etc/passwd"));
    assert!(
        ok && passwd.lines().any(|l| l.starts_with("ferry:")),
        "{}: systemd-sysusers made no user ferry: {out}\n{passwd}",
        file.display()
    );
}

#[test]
fn kubernetes_manifests_validate() {
    let manifests = manifests();
    assert!(manifests.len() >= 8, "manifests: {manifests:?}");
    let (ok, out) = kubernetes_validate(&manifests);
    assert!(
        ok && out.trim().is_empty(),
        "kubernetes-validate of {}: {out}",
        deploy("kubernetes").display()
    );
}

#[test]
fn kubernetes_validate_rejects_a_broken_manifest() {
    let manifest = deploy("kubernetes/ingest.yaml");
    let good = read(&manifest);
    // A misspelt field (only --strict refuses it) and a value of the wrong type.
    let breaks = [
        ("readinessProbe:", "readinesProbe:"),
        ("replicas: 1", "replicas: one"),
    ];
    for (from, to) in breaks {
        assert!(good.contains(from), "{}: no {from:?}", manifest.display());
        let dir = tempdir();
        let copy = write(dir.path(), "ingest.yaml", &good.replacen(from, to, 1));
        let (ok, out) = kubernetes_validate(&[copy]);
        assert!(
            !ok && out.contains("ingest.yaml"),
            "kubernetes-validate passed {} with {to:?}: {out}",
            manifest.display()
        );
    }
}

/// Every command line a unit or a container runs, with the file it is in.
fn command_lines() -> Vec<(PathBuf, Vec<String>)> {
    let mut out = Vec::new();
    for unit in units() {
        for line in read(&unit).lines() {
            if let Some(cmd) = line.strip_prefix("ExecStart=") {
                out.push((
                    unit.clone(),
                    cmd.split_whitespace().map(String::from).collect(),
                ));
            }
        }
    }
    for manifest in manifests() {
        for line in read(&manifest).lines() {
            // One-line flow sequences of quoted strings, which JSON reads.
            if let Some(cmd) = line.trim().strip_prefix("command: ") {
                let words = serde_json::from_str(cmd).unwrap_or_else(|e| {
                    panic!(
                        "{}: command {cmd} is not a list of strings: {e}",
                        manifest.display()
                    )
                });
                out.push((manifest.clone(), words));
            }
        }
    }
    out
}

/// `args` with the value of `--config` replaced by `config`.
fn with_config(args: &[String], config: &Path) -> Vec<String> {
    let mut out = args.to_vec();
    let at = out.iter().position(|a| a == "--config").map(|i| i + 1);
    if let Some(value) = at.and_then(|i| out.get_mut(i)) {
        *value = config.display().to_string();
    }
    out
}

#[test]
fn commands_use_flags_the_binaries_take() {
    let dir = tempdir();
    let missing = dir.path().join("missing.toml");
    let lines = command_lines();
    // Seven units with a command, six Deployments, their 17 probes.
    assert_eq!(lines.len(), 30, "commands found: {lines:?}");
    for (file, words) in &lines {
        let Some((program, args)) = words.split_first() else {
            panic!("{}: an empty command", file.display());
        };
        let name = program
            .strip_prefix("/usr/local/bin/")
            .unwrap_or_else(|| panic!("{}: {program} is not in /usr/local/bin", file.display()));
        let out = Command::new(bin(name))
            .args(with_config(args, &missing))
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap_or_else(|e| panic!("running {name}: {e}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        // clap refuses a flag or value it does not take with exit 2, before anything else; a
        // command line it takes gets as far as the config file, which is missing.
        assert!(
            out.status.code() == Some(1) && stderr.contains(&missing.display().to_string()),
            "{}: `{}` is not a command line {name} takes ({}): {stderr}",
            file.display(),
            words.join(" "),
            out.status
        );
    }
}

/// The text of the block scalar `key: |` in a YAML file, dedented: enough YAML for the
/// ConfigMap (the block ends at the first non-empty line indented less than its first).
fn block_scalar(yaml: &str, key: &str) -> Option<String> {
    let header = format!("{key}: |");
    let mut lines = yaml
        .lines()
        .skip_while(|l| l.trim() != header)
        .skip(1)
        .peekable();
    let first = lines.peek()?;
    let indent = first.len() - first.trim_start().len();
    let body: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
        .map(|l| l.get(indent..).unwrap_or_default())
        .collect();
    Some(body.join("\n"))
}

#[test]
fn configmap_holds_a_valid_mesh_config() {
    let path = deploy("kubernetes/configmap.yaml");
    let text = block_scalar(&read(&path), "ferry.toml")
        .unwrap_or_else(|| panic!("{}: no ferry.toml block", path.display()));
    let cfg: MeshConfig =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{}: ferry.toml: {e}", path.display()));
    let cfg = cfg
        .finish()
        .unwrap_or_else(|e| panic!("{}: ferry.toml: {e}", path.display()));
    for c in Component::ALL
        .into_iter()
        .filter(|c| *c != Component::Gateway)
    {
        // Without an entry the hosts would be handed the loopback address for the pod's
        // 0.0.0.0; for an IP address Ferry's clients check the name "localhost", which the
        // vault's server certificate carries, where a DNS name would have to be in it.
        let endpoint = cfg.endpoints.get(c.as_str()).map(String::as_str);
        let addr = endpoint
            .and_then(|e| e.strip_prefix("https://"))
            .and_then(|a| a.parse::<SocketAddr>().ok());
        assert!(
            addr.is_some(),
            "{}: [endpoints] {c} = {endpoint:?}, not https://IP:PORT",
            path.display()
        );
    }
    // The registry hands gateway.listen to the hosts as it is.
    assert!(
        !cfg.gateway.listen.ip().is_unspecified(),
        "{}: gateway.listen {} is no address a host can reach",
        path.display(),
        cfg.gateway.listen
    );
}

/// The `containerPort` of a manifest's container.
fn container_port(text: &str) -> Option<u16> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("containerPort: "))
        .and_then(|p| p.trim().parse().ok())
}

#[test]
fn probes_ask_ferry_status_on_the_pods_own_port() {
    for manifest in manifests() {
        let text = read(&manifest);
        let Some(port) = container_port(&text) else {
            continue; // the ConfigMap
        };
        let component = file_name(&manifest).trim_end_matches(".yaml").to_owned();
        let endpoint = match component.as_str() {
            "gateway" => format!("127.0.0.1:{port}"),
            _ => format!("https://127.0.0.1:{port}"),
        };
        // grpc.health.v1 over TLS (QUIC for the gateway), through `ferry status`: the
        // kubelet's own grpc: probe speaks plaintext to ports that speak TLS only.
        let want = format!(
            r#"command: ["/usr/local/bin/ferry", "--config", "/etc/ferry/ferry.toml", "status", "--component", "{component}", "--endpoint", "{endpoint}"]"#
        );
        let probes = text
            .lines()
            .filter(|l| l.trim().ends_with("Probe:"))
            .count();
        let asks = text.lines().filter(|l| l.trim() == want).count();
        // startup, readiness, liveness; the gateway starts at once (readiness, liveness).
        let expected = if component == "gateway" { 2 } else { 3 };
        assert_eq!(
            (probes, asks),
            (expected, expected),
            "{}: each probe must run {want}",
            manifest.display()
        );
        assert!(
            !text.lines().any(|l| l.trim() == "grpc:"),
            "{}: a plaintext grpc: probe",
            manifest.display()
        );
    }
}

/// The first word that looks generated: 32 or more key, token or base64 characters, digits
/// and letters mixed, as keys, tokens and passwords are and the files' names and paths not.
fn random_looking_word(text: &str) -> Option<&str> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || "+/=_-".contains(c)))
        .find(|w| {
            w.len() >= 32
                && w.chars().filter(char::is_ascii_digit).count() >= 4
                && w.chars().filter(char::is_ascii_alphabetic).count() >= 8
        })
}

/// The `key: value` entries of a Secret document's `data:` and `stringData:`.
fn secret_values(doc: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut in_values = false;
    for line in doc.lines() {
        let entry = line.trim();
        if entry.is_empty() || entry.starts_with('#') {
            continue;
        }
        if !line.starts_with(' ') {
            in_values = matches!(entry, "data:" | "stringData:");
        } else if in_values && let Some((key, value)) = entry.split_once(':') {
            out.push((key.trim().to_owned(), value.trim().to_owned()));
        }
    }
    out
}

/// Every Secret document of the manifests: (file, document).
fn secret_documents() -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for manifest in manifests() {
        for doc in read(&manifest).split("\n---") {
            if doc.lines().any(|l| l.trim() == "kind: Secret") {
                out.push((manifest.clone(), doc.to_owned()));
            }
        }
    }
    out
}

#[test]
fn no_file_holds_a_secret() {
    let all = [deploy("systemd"), deploy("kubernetes")]
        .iter()
        .flat_map(|d| files(d, &[""]))
        .collect::<Vec<_>>();
    for path in &all {
        let text = read(path);
        assert!(
            !text.contains("-----BEGIN"),
            "{}: a PEM block",
            path.display()
        );
        if let Some(word) = random_looking_word(&text) {
            panic!(
                "{}: {word:?} looks like a key or a token; only {PLACEHOLDER} goes where a secret does",
                path.display()
            );
        }
    }
    let mut values = 0;
    for (path, doc) in secret_documents() {
        for (key, value) in secret_values(&doc) {
            assert_eq!(value, PLACEHOLDER, "{}: Secret value {key}", path.display());
            values += 1;
        }
    }
    assert!(
        values > 0,
        "no Secret values under deploy/kubernetes: nothing was checked"
    );
}

#[test]
fn secret_checks_catch_a_secret() {
    // Made here, so that this file holds no key either.
    let key = hex::encode(blake3::hash(b"not a real key").as_bytes());
    assert_eq!(
        random_looking_word(&format!("data.key: {key}\n")),
        Some(key.as_str())
    );
    let doc = format!("kind: Secret\nstringData:\n  # comment\n  data.key: {key}\nother: x\n");
    assert_eq!(secret_values(&doc), [("data.key".to_owned(), key)]);
}

#[test]
fn mounted_vault_files_are_in_the_secret_template() {
    let keys: Vec<String> = secret_documents()
        .iter()
        .flat_map(|(_, doc)| secret_values(doc))
        .map(|(key, _)| key)
        .collect();
    for manifest in manifests() {
        for line in read(&manifest).lines() {
            let Some(rest) = line.trim().strip_prefix("- {key: ") else {
                continue;
            };
            let key = rest.split(',').next().unwrap_or_default();
            assert!(
                keys.iter().any(|k| k == key),
                "{}: mounts Secret key {key}, which the template does not have: {keys:?}",
                manifest.display()
            );
        }
    }
}
