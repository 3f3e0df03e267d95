//! Fuzzing of the control protocol's codecs (issue 14): arbitrary lines, JSON of the right
//! shape with wrong fields, types and values, nesting deep enough to exhaust a recursive
//! parser, and every request round-tripped. Decoding never panics; a line that is not a
//! request gets the typed `bad_request` error; an accepted line is exactly a request, which
//! encodes back to one line that decodes to it. JSON carries no length fields, so nothing
//! is sized from the input (a line's length is capped before it is decoded: `MAX_LINE`).
//!
//! 256 cases per property in `cargo test`; `TESSEL_FUZZ_CASES=N` runs more (tools/fuzz).

use super::proto::*;
use proptest::prelude::*;
use serde_json::{json, Value};

const OPS: &[&str] = &[
    "volume_create",
    "volume_delete",
    "volume_resize",
    "volume_list",
    "volume_info",
    "volume_rollback",
    "snapshot_create",
    "snapshot_delete",
    "snapshot_protect",
    "snapshot_unprotect",
    "snapshot_list",
    "clone_create",
    "clone_inflate",
    "export_add",
    "export_remove",
    "export_list",
    "stats",
    "schedule_set",
    "schedule_remove",
    "schedule_list",
    "session_list",
    "session_close",
    "shutdown",
];

const FIELDS: &[&str] = &[
    "name",
    "size",
    "block_size",
    "volume",
    "snapshot",
    "force",
    "new_volume",
    "wait",
    "every_secs",
    "keep",
    "id",
    "op",
    "status",
    "code",
    "message",
    "data",
];

fn name() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9._@-]{0,12}", ".{0,20}"]
}

fn request() -> impl Strategy<Value = ControlRequest> {
    use ControlRequest as R;
    let n = name;
    prop_oneof![
        (n(), any::<u64>(), any::<u32>()).prop_map(|(name, size, block_size)| R::VolumeCreate {
            name,
            size,
            block_size
        }),
        (n(), any::<bool>()).prop_map(|(name, force)| R::VolumeDelete { name, force }),
        (n(), any::<u64>()).prop_map(|(name, size)| R::VolumeResize { name, size }),
        Just(R::VolumeList),
        n().prop_map(|name| R::VolumeInfo { name }),
        (n(), n(), any::<bool>()).prop_map(|(volume, snapshot, force)| R::VolumeRollback {
            volume,
            snapshot,
            force
        }),
        (n(), n()).prop_map(|(volume, name)| R::SnapshotCreate { volume, name }),
        (n(), n(), any::<bool>()).prop_map(|(volume, name, force)| R::SnapshotDelete {
            volume,
            name,
            force
        }),
        (n(), n()).prop_map(|(volume, name)| R::SnapshotProtect { volume, name }),
        (n(), n()).prop_map(|(volume, name)| R::SnapshotUnprotect { volume, name }),
        proptest::option::of(n()).prop_map(|volume| R::SnapshotList { volume }),
        (n(), n(), n()).prop_map(|(volume, snapshot, new_volume)| R::CloneCreate {
            volume,
            snapshot,
            new_volume
        }),
        (n(), any::<bool>()).prop_map(|(volume, wait)| R::CloneInflate { volume, wait }),
        n().prop_map(|name| R::ExportAdd { name }),
        n().prop_map(|name| R::ExportRemove { name }),
        Just(R::ExportList),
        Just(R::Stats),
        (n(), any::<u64>(), any::<u32>()).prop_map(|(volume, every_secs, keep)| {
            R::ScheduleSet {
                volume,
                every_secs,
                keep,
            }
        }),
        n().prop_map(|volume| R::ScheduleRemove { volume }),
        Just(R::ScheduleList),
        Just(R::SessionList),
        any::<u64>().prop_map(|id| R::SessionClose { id }),
        Just(R::Shutdown),
    ]
}

/// Any JSON value, a few levels deep, numbers at the edges of every integer type.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|v| json!(v)),
        any::<u64>().prop_map(|v| json!(v)),
        any::<f64>().prop_map(|v| json!(v)),
        proptest::sample::select(vec![
            json!(-1),
            json!(0),
            json!(u32::MAX as u64 + 1),
            json!(u64::MAX),
            json!(1e300),
            json!(4096.5),
        ]),
        name().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec(
                (
                    proptest::sample::select(FIELDS).prop_map(str::to_string),
                    inner
                ),
                0..4
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// An object shaped like a request: a known or unknown op, known fields with any value,
/// fields left out, unknown fields added.
fn request_shaped() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            4 => proptest::sample::select(OPS).prop_map(|op| json!(op)),
            1 => value(),
        ],
        proptest::collection::vec(
            (
                prop_oneof![
                    4 => proptest::sample::select(FIELDS).prop_map(str::to_string),
                    1 => ".{0,8}",
                ],
                value(),
            ),
            0..6,
        ),
        any::<bool>(),
    )
        .prop_map(|(op, fields, drop_op)| {
            let mut m: serde_json::Map<String, Value> = fields.into_iter().collect();
            if !drop_op {
                m.insert("op".into(), op);
            }
            Value::Object(m)
        })
}

/// A line decodes to a request that encodes back to it, or to `bad_request`.
fn decodes_or_is_refused(line: &str) -> Result<(), TestCaseError> {
    match decode_request(line) {
        Ok(request) => {
            let again = encode_request(&request);
            prop_assert_eq!(decode_request(&again), Ok(request));
        }
        Err(ControlResponse::Error { code, message }) => {
            prop_assert_eq!(code, ErrorCode::BadRequest.as_str());
            prop_assert!(message.starts_with("bad request: "), "{}", message);
        }
        Err(other) => prop_assert!(false, "not an error response: {:?}", other),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases()))]

    #[test]
    fn every_request_round_trips(request in request()) {
        let line = encode_request(&request);
        prop_assert!(line.ends_with('\n') && !line.trim_end_matches('\n').contains('\n'));
        prop_assert_eq!(decode_request(&line), Ok(request));
    }

    #[test]
    fn arbitrary_bytes_are_a_request_or_a_bad_request(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        decodes_or_is_refused(&String::from_utf8_lossy(&bytes))?;
        let _ = decode_response(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn request_shaped_json_is_a_request_or_a_bad_request(v in request_shaped()) {
        decodes_or_is_refused(&v.to_string())?;
    }

    /// A valid request line cut, spliced or with a byte changed.
    #[test]
    fn mutated_request_lines_are_a_request_or_a_bad_request(
        request in request(),
        at in any::<usize>(),
        byte in any::<u8>(),
        cut in any::<bool>(),
    ) {
        let mut line = encode_request(&request).into_bytes();
        let at = at % line.len();
        if cut {
            line.truncate(at);
        } else {
            line[at] = byte;
        }
        decodes_or_is_refused(&String::from_utf8_lossy(&line))?;
    }

    #[test]
    fn response_shaped_json_decodes_or_fails_without_panic(v in value()) {
        if let Ok(r) = decode_response(&v.to_string()) {
            let _ = r.clone().into_data::<VolumeInfo>();
            let _ = r.into_data::<Stats>();
        }
    }
}

/// Nesting far past serde_json's recursion limit (128) is refused, not a stack overflow,
/// in requests and in responses the client reads.
#[test]
fn deeply_nested_lines_are_refused_without_exhausting_the_stack() {
    for depth in [200, 100_000] {
        let arrays = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let objects = format!(
            "{{\"op\":\"volume_info\",\"name\":{}1{}}}",
            "{\"a\":".repeat(depth),
            "}".repeat(depth)
        );
        for line in [&arrays, &objects] {
            assert!(decode_request(line).is_err());
            assert!(decode_response(line).is_err());
        }
    }
}
