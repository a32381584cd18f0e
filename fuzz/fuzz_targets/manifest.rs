//! The manifest parser must never panic, and anything it accepts must re-encode to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = convoy_bundle::Manifest::from_canonical(data) {
        assert_eq!(m.to_canonical(), data);
    }
    let mut cursor = data;
    let _ = convoy_bundle::read_header(&mut cursor, 1 << 20);
});
