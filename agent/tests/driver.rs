//! The drivers that start and stop recovered VMs: `[driver]` in agent.toml, the command hooks
//! (environment, failures, timeout, cancellation) and the libvirt domain XML, checked by a
//! real `virsh` on libvirt's in-process test driver (`test:///default`).
//!
//! The test driver keeps its state inside one virsh process, so a domain defined by one virsh
//! run is gone in the next; a whole define-and-start is therefore checked in one virsh command
//! string, and `Driver::start` against it is expected to define and then fail at the start.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_agent::AgentConfig;
use ferry_agent::driver::{
    Driver, DriverError, Network, Nic, RunDisk, VmRun, VmSpec, domain_xml, write_spec,
};
use tokio_util::sync::CancellationToken;

const TEST_URI: &str = "test:///default";

fn agent_toml(dir: &Path, driver: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    let text = format!(
        r#"
registration_key = "key.json"
data_dir = "data"
[host]
name = "hv02"
site = "site-b"
[[vm]]
name = "web01"
disks = ["web01.raw"]
{driver}
"#
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn load_driver(dir: &Path, driver: &str) -> Driver {
    let cfg = AgentConfig::load(&agent_toml(dir, driver)).expect("config loads");
    let base = cfg
        .driver
        .as_ref()
        .map(|d| d.base_dir.clone())
        .unwrap_or_default();
    Driver::from_config(cfg.driver.as_ref(), &base).expect("driver")
}

fn load_error(dir: &Path, driver: &str) -> String {
    AgentConfig::load(&agent_toml(dir, driver))
        .expect_err("config refused")
        .to_string()
}

fn spec(name: &str, networks: &[&str]) -> VmSpec {
    VmSpec {
        name: name.into(),
        cpus: 2,
        memory_mib: 2048,
        nics: networks
            .iter()
            .enumerate()
            .map(|(i, n)| Nic {
                name: format!("nic{i}"),
                network: n.to_string(),
                ip: if i == 0 {
                    "10.2.0.7/24".into()
                } else {
                    String::new()
                },
            })
            .collect(),
    }
}

/// A run of `vm` with its folder under `root` and its spec written there.
fn vm_run(root: &Path, vm: &str, disks: Vec<RunDisk>, networks: &[&str]) -> VmRun {
    let dir = root.join("recovery").join("vm");
    std::fs::create_dir_all(&dir).unwrap();
    let spec = spec(vm, networks);
    let spec_path = dir.join("spec.json");
    write_spec(&spec_path, &spec).unwrap();
    VmRun {
        vm: vm.into(),
        network: Network::Test,
        spec_path,
        spec,
        disks,
        dir,
    }
}

fn disk(path: &str, format: &str, nbd_uri: &str) -> RunDisk {
    RunDisk {
        path: path.into(),
        format: format.into(),
        nbd_uri: nbd_uri.into(),
    }
}

fn script(dir: &Path, name: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The process is gone: no /proc entry, or a zombie nobody reaped yet (in a container the
/// init process may never reap orphans).
fn gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

async fn wait_gone(pid: &str) -> bool {
    for _ in 0..100 {
        if gone(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn wait_file(path: &Path) -> String {
    for _ in 0..200 {
        if let Ok(s) = std::fs::read_to_string(path)
            && !s.is_empty()
        {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{} never appeared", path.display());
}

/// `virsh -c test:///default ARGS` (fails the test, never skips it, when virsh is missing).
fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .arg("-c")
        .arg(TEST_URI)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .expect("virsh is missing: deploy/packages.sh installs it (Debian libvirt-clients)")
}

/// One word for virsh's own command-string parser (which quotes like sh).
fn vq(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The hook runs in the config's folder (a relative `./start-vm.sh` works) and finds the VM,
/// its network, its spec file and its disks in the environment.
#[tokio::test]
async fn command_start_hands_the_vm_to_the_hook() {
    let base = tempfile::tempdir().unwrap();
    script(
        base.path(),
        "start-vm.sh",
        r#"
d="$FERRY_VM_DIR"
printf '%s\n' "$FERRY_VM" "$FERRY_NETWORK" "$FERRY_VM_SPEC" "$(pwd)" > "$d/env.txt"
printf '%s' "$FERRY_DISKS" > "$d/disks.json"
cp "$FERRY_VM_SPEC" "$d/spec-seen.json"
echo "starting $FERRY_VM"
"#,
    );
    let driver = load_driver(
        base.path(),
        "[driver]\nkind = \"command\"\nstart = \"./start-vm.sh\"\nstop = \"true\"",
    );
    assert_eq!(driver.kind(), "command");
    let disks = vec![
        disk(
            "/srv/web01-os.vhdx",
            "vhdx",
            "nbd+unix:///web01-os?socket=/run/t.sock",
        ),
        disk("/srv/web01-data.raw", "raw", ""),
    ];
    let run = vm_run(base.path(), "web01", disks.clone(), &["isolated"]);
    driver
        .start(&run, &CancellationToken::new())
        .await
        .expect("start");

    let env = std::fs::read_to_string(run.dir.join("env.txt")).unwrap();
    let lines: Vec<&str> = env.lines().collect();
    let base_dir = std::fs::canonicalize(base.path()).unwrap();
    assert_eq!(
        lines,
        [
            "web01",
            "test",
            run.spec_path.to_str().unwrap(),
            base_dir.to_str().unwrap()
        ]
    );
    let raw = std::fs::read_to_string(run.dir.join("disks.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(
        json,
        serde_json::json!([
            {"path": "/srv/web01-os.vhdx", "format": "vhdx", "nbd_uri": "nbd+unix:///web01-os?socket=/run/t.sock"},
            {"path": "/srv/web01-data.raw", "format": "raw", "nbd_uri": ""},
        ])
    );
    let back: Vec<RunDisk> = serde_json::from_str(&raw).unwrap();
    assert_eq!(back, disks);
    let seen: VmSpec =
        serde_json::from_slice(&std::fs::read(run.dir.join("spec-seen.json")).unwrap()).unwrap();
    assert_eq!(seen, run.spec);
    assert_eq!(seen.nics[0].ip, "10.2.0.7/24");
    let log = std::fs::read_to_string(run.dir.join("driver.log")).unwrap();
    assert!(log.contains("starting web01"), "{log}");
}

/// A stop that exits non-zero is an error naming the vm, the command, the status and the end
/// of what it wrote to stderr (at most ~1 KiB of it).
#[tokio::test]
async fn a_failing_stop_names_the_status_and_stderr() {
    let base = tempfile::tempdir().unwrap();
    let driver = load_driver(
        base.path(),
        r#"[driver]
kind = "command"
start = "true"
stop = "head -c 5000 /dev/zero | tr '\\0' x >&2; echo; echo \"cannot reach the hypervisor for $FERRY_VM\" >&2; exit 3"
"#,
    );
    let run = vm_run(base.path(), "web01", vec![], &[]);
    let err = driver
        .stop(&run, &CancellationToken::new())
        .await
        .expect_err("stop fails");
    assert!(matches!(err, DriverError::Failed { .. }), "{err:?}");
    let msg = err.to_string();
    for part in [
        "vm web01",
        "stop",
        "exit 3",
        "exit status: 3",
        "cannot reach the hypervisor for web01",
    ] {
        assert!(msg.contains(part), "{part:?} not in {msg}");
    }
    assert!(
        msg.len() < 1600,
        "the stderr tail is not cut: {} bytes",
        msg.len()
    );
}

/// A hook past the timeout is killed with what it started, and the error says so.
#[tokio::test]
async fn a_hook_past_the_timeout_is_killed_with_its_children() {
    let base = tempfile::tempdir().unwrap();
    let driver = load_driver(
        base.path(),
        r#"[driver]
kind = "command"
start = 'echo $$ > "$FERRY_VM_DIR/sh.pid"; sleep 300 & echo $! > "$FERRY_VM_DIR/child.pid"; echo waiting >&2; wait'
stop = "true"
timeout = "1s"
"#,
    );
    let run = vm_run(base.path(), "web01", vec![], &[]);
    let err = driver
        .start(&run, &CancellationToken::new())
        .await
        .expect_err("timeout");
    assert!(matches!(err, DriverError::Timeout { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("within 1s") && msg.contains("killed") && msg.contains("waiting"),
        "{msg}"
    );
    let sh = std::fs::read_to_string(run.dir.join("sh.pid")).unwrap();
    let child = std::fs::read_to_string(run.dir.join("child.pid")).unwrap();
    assert!(wait_gone(&sh).await, "sh {sh} still runs");
    assert!(wait_gone(&child).await, "its child {child} still runs");
}

/// Cancelling a start kills the hook and its children at once.
#[tokio::test]
async fn cancelling_a_hook_kills_it() {
    let base = tempfile::tempdir().unwrap();
    let driver = load_driver(
        base.path(),
        r#"[driver]
kind = "command"
start = 'sleep 300 & echo $! > "$FERRY_VM_DIR/child.pid"; wait'
stop = "true"
"#,
    );
    let run = vm_run(base.path(), "web01", vec![], &[]);
    let cancel = CancellationToken::new();
    let task = {
        let (driver, run, cancel) = (driver.clone(), run.clone(), cancel.clone());
        tokio::spawn(async move { driver.start(&run, &cancel).await })
    };
    let child = wait_file(&run.dir.join("child.pid")).await;
    cancel.cancel();
    let err = task.await.unwrap().expect_err("cancelled");
    assert!(matches!(err, DriverError::Cancelled { .. }), "{err:?}");
    assert!(err.to_string().contains("cancelled"), "{err}");
    assert!(wait_gone(&child).await, "child {child} still runs");
}

/// A process a start hook leaves running (the VM) is left alone once the hook succeeded.
#[tokio::test]
async fn what_a_successful_hook_leaves_running_keeps_running() {
    let base = tempfile::tempdir().unwrap();
    let driver = load_driver(
        base.path(),
        r#"[driver]
kind = "command"
start = 'sleep 300 & echo $! > "$FERRY_VM_DIR/vm.pid"'
stop = 'kill "$(cat "$FERRY_VM_DIR/vm.pid")"'
"#,
    );
    let run = vm_run(base.path(), "web01", vec![], &[]);
    driver
        .start(&run, &CancellationToken::new())
        .await
        .expect("start");
    let pid = std::fs::read_to_string(run.dir.join("vm.pid")).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!gone(&pid), "the vm process {pid} was killed");
    driver
        .stop(&run, &CancellationToken::new())
        .await
        .expect("stop");
    assert!(wait_gone(&pid).await, "stop left {pid} running");
}

/// Without `[driver]` the host is kind none: disks only, no VM started, nothing written.
#[tokio::test]
async fn kind_none_starts_and_stops_nothing() {
    let base = tempfile::tempdir().unwrap();
    let driver = load_driver(base.path(), "");
    assert_eq!(driver.kind(), "none");
    let explicit = load_driver(base.path(), "[driver]\nkind = \"none\"");
    assert_eq!(explicit.kind(), "none");
    let run = vm_run(
        base.path(),
        "web01",
        vec![disk("/srv/a.raw", "raw", "")],
        &[],
    );
    let cancel = CancellationToken::new();
    driver.start(&run, &cancel).await.unwrap();
    driver.stop(&run, &cancel).await.unwrap();
    driver.remove(&run, &cancel).await.unwrap();
    let files: Vec<_> = std::fs::read_dir(&run.dir).unwrap().collect();
    assert_eq!(files.len(), 1, "only the spec the test wrote: {files:?}");
}

#[test]
fn config_refuses_an_unknown_kind_naming_the_allowed_ones() {
    let base = tempfile::tempdir().unwrap();
    let msg = load_error(base.path(), "[driver]\nkind = \"hyperv\"");
    for part in ["hyperv", "none", "command", "libvirt"] {
        assert!(msg.contains(part), "{part:?} not in {msg}");
    }
}

#[test]
fn config_refuses_a_command_driver_without_stop_and_unknown_keys() {
    let base = tempfile::tempdir().unwrap();
    let msg = load_error(
        base.path(),
        "[driver]\nkind = \"command\"\nstart = \"./start-vm.sh\"",
    );
    assert!(
        msg.contains("needs stop") && msg.contains("agent.toml"),
        "{msg}"
    );
    let msg = load_error(base.path(), "[driver]\nkind = \"libvirt\"\nurl = \"x\"");
    assert!(msg.contains("url"), "{msg}");
    let msg = load_error(
        base.path(),
        "[driver]\nkind = \"libvirt\"\nstart = \"./start-vm.sh\"",
    );
    assert!(msg.contains("start is for kind"), "{msg}");
    let msg = load_error(
        base.path(),
        "[driver]\nkind = \"libvirt\"\ntimeout = \"soon\"",
    );
    assert!(msg.contains("timeout"), "{msg}");
}

#[test]
fn config_keeps_the_folder_the_commands_run_in_and_the_vm_shape() {
    let base = tempfile::tempdir().unwrap();
    let path = agent_toml(
        base.path(),
        "[driver]\nkind = \"libvirt\"\nuri = \"test:///default\"\ntimeout = \"90s\"",
    );
    let cfg = AgentConfig::load(&path).unwrap();
    let d = cfg.driver.as_ref().unwrap();
    assert_eq!(d.base_dir, base.path());
    assert_eq!(d.uri.as_deref(), Some(TEST_URI));
    assert_eq!(d.timeout, Some(Duration::from_secs(90)));
    let driver = Driver::from_config(Some(d), &d.base_dir).unwrap();
    assert_eq!(
        (driver.kind(), driver.timeout()),
        ("libvirt", Duration::from_secs(90))
    );
    // The VM shape's defaults.
    let vm = &cfg.vms[0];
    assert_eq!((vm.cpus, vm.memory, vm.networks.len()), (1, 1024, 0));

    let text = r#"
registration_key = "key.json"
data_dir = "data"
[host]
name = "hv02"
[[vm]]
name = "db01"
disks = ["db01.vhdx"]
cpus = 4
memory = 8192
networks = ["prod", "backup"]
"#;
    std::fs::write(&path, text).unwrap();
    let cfg = AgentConfig::load(&path).unwrap();
    let vm = &cfg.vms[0];
    assert_eq!((vm.cpus, vm.memory), (4, 8192));
    assert_eq!(vm.networks, ["prod", "backup"]);
    std::fs::write(&path, text.replace("cpus = 4", "cpus = 0")).unwrap();
    let msg = AgentConfig::load(&path).unwrap_err().to_string();
    assert!(msg.contains("db01") && msg.contains("cpu"), "{msg}");
}

fn write_xml(run: &VmRun) -> PathBuf {
    let xml = domain_xml(run, TEST_URI).expect("domain xml");
    let file = run.dir.join("domain.xml");
    std::fs::write(&file, xml).unwrap();
    file
}

/// NBD disks (Unix socket and TCP, a VHDX among them) and raw and VHD files make a domain the
/// real virsh defines, with the shape of the spec.
#[test]
fn domain_xml_with_nbd_and_file_disks_is_defined_by_virsh() {
    let base = tempfile::tempdir().unwrap();
    let disks = vec![
        disk(
            "/srv/web01-os.vhdx",
            "vhdx",
            "nbd+unix:///web01-os.vhdx?socket=/run/ferry/t.sock",
        ),
        disk(
            "/srv/web01-data.raw",
            "raw",
            "nbd://127.0.0.1:10810/web01-data.raw",
        ),
        disk("/srv/web01-logs.vhd", "vhd", ""),
        disk("/srv/web01-swap.raw", "raw", ""),
    ];
    let run = vm_run(base.path(), "web01", disks, &["default", "backup"]);
    let file = write_xml(&run);
    let file = file.to_str().unwrap();
    let out = virsh(&["define", file]);
    assert!(out.status.success(), "{}", text(&out));

    let out = virsh(&[&format!("define {}; dumpxml web01", vq(file))]);
    assert!(out.status.success(), "{}", text(&out));
    let xml = String::from_utf8_lossy(&out.stdout);
    for part in [
        "<memory unit='KiB'>2097152</memory>",
        ">2</vcpu>",
        "<source protocol='nbd' name='web01-os.vhdx'>",
        "<host transport='unix' socket='/run/ferry/t.sock'/>",
        "<source protocol='nbd' name='web01-data.raw'>",
        "<host name='127.0.0.1' port='10810'/>",
        "type='vpc'",
        "<source file='/srv/web01-logs.vhd'/>",
        "<target dev='vda' bus='virtio'/>",
        "<target dev='vdd' bus='virtio'/>",
        "<source network='default'/>",
        "<source network='backup'/>",
        "<acpi/>",
    ] {
        assert!(xml.contains(part), "{part:?} not in {xml}");
    }
}

/// A whole start on the test driver, in one virsh process: defined, started, running.
#[test]
fn the_domain_starts_on_libvirts_test_driver() {
    let base = tempfile::tempdir().unwrap();
    let run = vm_run(
        base.path(),
        "web01",
        vec![disk(
            "/srv/web01.raw",
            "raw",
            "nbd+unix:///web01?socket=/run/t.sock",
        )],
        &["default"],
    );
    let file = write_xml(&run);
    let out = virsh(&[&format!(
        "define {}; start web01; domstate web01",
        vq(file.to_str().unwrap())
    )]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("running"),
        "{}",
        text(&out)
    );
}

/// `<&'"` in the vm name, a network and a disk path are escaped: virsh defines the domain and
/// reads back exactly those names.
#[test]
fn hostile_names_are_escaped() {
    let base = tempfile::tempdir().unwrap();
    let vm = r#"we<b&'"01>"#;
    let net = r#"lan<&'">"#;
    let run = vm_run(
        base.path(),
        vm,
        vec![disk(r#"/srv/a&b'<c>".raw"#, "raw", "")],
        &[net],
    );
    let file = write_xml(&run);
    let out = virsh(&[&format!(
        "define {f}; list --all --name; domiflist {n}; domblklist {n}",
        f = vq(file.to_str().unwrap()),
        n = vq(vm)
    )]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.lines().any(|l| l.trim() == vm), "{stdout}");
    assert!(stdout.contains(net), "{stdout}");
    assert!(stdout.contains(r#"/srv/a&b'<c>".raw"#), "{stdout}");
}

/// What XML or a file name cannot hold is refused before anything runs, never written half.
#[test]
fn what_xml_cannot_hold_is_refused() {
    let base = tempfile::tempdir().unwrap();
    for (vm, net, d) in [
        ("a/b", "default", disk("/srv/a.raw", "raw", "")),
        ("a\u{1}b", "default", disk("/srv/a.raw", "raw", "")),
        ("web01", "lan\u{7}", disk("/srv/a.raw", "raw", "")),
        ("web01", "default", disk("/srv/a.qcow2", "qcow2", "")),
        // libvirt has no VHDX format: only through the tracker's NBD export.
        ("web01", "default", disk("/srv/a.vhdx", "vhdx", "")),
        ("web01", "default", disk("/srv/a.raw", "raw", "http://x/a")),
        (
            "web01",
            "default",
            disk("/srv/a.raw", "raw", "nbd+unix:///a"),
        ),
    ] {
        let run = vm_run(base.path(), vm, vec![d], &[net]);
        match domain_xml(&run, TEST_URI) {
            Err(DriverError::BadRun { message, .. }) => assert!(!message.is_empty()),
            other => panic!("{vm:?} {net:?}: {other:?}"),
        }
    }
}

/// `Driver::start` writes `<dir>/<vm>.xml` and defines it; on the test driver the next virsh
/// process no longer knows the domain, so the start step fails and says which step. A stop
/// and a remove of a domain libvirt does not know succeed (it is off; it is gone).
#[tokio::test]
async fn the_libvirt_driver_defines_then_starts_in_separate_virsh_calls() {
    let base = tempfile::tempdir().unwrap();
    let driver = load_driver(
        base.path(),
        "[driver]\nkind = \"libvirt\"\nuri = \"test:///default\"\ntimeout = \"20s\"",
    );
    let run = vm_run(
        base.path(),
        "web01",
        vec![disk(
            "/srv/web01.raw",
            "raw",
            "nbd+unix:///web01?socket=/run/t.sock",
        )],
        &["default"],
    );
    let cancel = CancellationToken::new();
    let err = driver
        .start(&run, &cancel)
        .await
        .expect_err("state is per process");
    let msg = err.to_string();
    assert!(
        matches!(err, DriverError::Failed { .. })
            && msg.contains("virsh -c test:///default start --domain web01")
            && msg.contains("failed to get domain"),
        "{msg}"
    );
    let xml = std::fs::read_to_string(run.dir.join("web01.xml")).unwrap();
    assert!(xml.starts_with("<domain type='test'>"), "{xml}");
    // The XML written is the one defined: it defines in a virsh of its own.
    let out = virsh(&["define", run.dir.join("web01.xml").to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));

    driver
        .stop(&run, &cancel)
        .await
        .expect("stop of an unknown domain");
    driver
        .remove(&run, &cancel)
        .await
        .expect("remove of an unknown domain");

    let mut bad = run.clone();
    bad.disks[0].nbd_uri = "nbd+unix:///web01".into();
    let err = driver.start(&bad, &cancel).await.expect_err("bad uri");
    assert!(matches!(err, DriverError::BadRun { .. }), "{err:?}");
}
