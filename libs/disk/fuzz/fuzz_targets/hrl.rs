//! Any bytes as an MS-HRL log: open (clean walk or prefix recovery) and read every record.
#![no_main]

use ferry_disk::hrl::HrlLog;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("ferry-fuzz-{}.hrl", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(log) = HrlLog::open(&path) {
        let mut buf = Vec::new();
        for r in log.records.iter().take(256) {
            buf.resize(r.length as usize, 0);
            let _ = log.read_record(r, &mut buf);
        }
    }
});
