//! A replication policy's defaults and limits, the same for the CLI that refuses a flag, the
//! registry that refuses a request and the storage-writer that thins points (a 0 on the
//! wire means the default: proto3 cannot tell it from "not given").
pub const DEFAULT_FREQUENCY_SECONDS: u64 = 300;
pub const MAX_FREQUENCY_SECONDS: u64 = 24 * 3600;
pub const DEFAULT_RETENTION_HOURS: u64 = 24;
pub const MAX_RETENTION_HOURS: u64 = 8760;
/// Every point younger than this is kept.
pub const DEFAULT_KEEP_ALL_SECONDS: u64 = 3600;
/// Older points are thinned to one per this interval.
pub const DEFAULT_THIN_TO_SECONDS: u64 = 300;

/// The network a test failover's NICs join when the policy names none.
pub const DEFAULT_TEST_NETWORK: &str = "ferry-test";

/// Checks a recovery-side network name (`--network-map`, `--test-network`): what a driver
/// can pass on (no control characters, not empty, at most 64 bytes).
pub fn check_network_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        return Err(format!(
            "{what} {name:?}: a network name is 1 to 64 characters without control characters"
        ));
    }
    Ok(())
}

/// Checks one `--ip` entry: a NIC name `nic<N>` and an address with its prefix length
/// (`10.2.0.7/24`, `2001:db8::7/64`).
pub fn check_nic_address(nic: &str, address: &str) -> Result<(), String> {
    let nic_ok = nic
        .strip_prefix("nic")
        .is_some_and(|n| !n.is_empty() && n.len() <= 3 && n.bytes().all(|b| b.is_ascii_digit()));
    if !nic_ok {
        return Err(format!(
            "--ip {nic}={address}: the NIC is nic0, nic1, ... (nic0 to nic999)"
        ));
    }
    let bad = || format!("--ip {nic}={address}: the address is IP/PREFIX, e.g. 10.2.0.7/24");
    let (ip, prefix) = address.split_once('/').ok_or_else(bad)?;
    let ip: std::net::IpAddr = ip.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(format!(
            "--ip {nic}={address}: the prefix length is 0 to {max}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_side_values() {
        assert!(check_nic_address("nic0", "10.2.0.7/24").is_ok());
        assert!(check_nic_address("nic1", "2001:db8::7/64").is_ok());
        for (nic, addr) in [
            ("eth0", "10.0.0.1/24"),
            ("nic0", "10.0.0.1"),
            ("nic0", "banana/24"),
            ("nic0", "10.0.0.1/33"),
            ("nic", "10.0.0.1/8"),
        ] {
            let e = check_nic_address(nic, addr).unwrap_err();
            assert!(e.contains("--ip"), "{e}");
        }
        assert!(check_network_name("--test-network", "isolated").is_ok());
        assert!(check_network_name("--test-network", "").is_err());
        assert!(check_network_name("--test-network", "a\nb").is_err());
    }
}
