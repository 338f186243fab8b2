//! Property tests for the two functions every byte a client sends goes
//! through first: the line decoder ([`read_line`]) and the request parser
//! ([`parse`]).
//!
//! On random bytes and random JSON:
//! - `parse` never panics. It accepts the line, or refuses it with one of
//!   the codes the protocol documents for a line it cannot use
//!   (`bad_json`, `bad_request`, `unknown_op`) and the `id` the protocol
//!   says: the line's own when the line is an object with a scalar `id`,
//!   `null` otherwise. What it accepts is the op the line names.
//! - `read_line` never panics. It returns every line within the limit
//!   exactly as sent, without its `\n` or `\r\n`; it says `TooLong` as soon
//!   as the bytes it has seen prove a line too long, without waiting for
//!   the newline or for EOF and without consuming past that byte; and it
//!   never holds more than the limit plus the one byte it must see to tell
//!   a `\r\n` from a longer line.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::{Index, select};
use serde_json::{Map, Number, Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, BufReader};

use super::{ReadLine, Socket, SocketReader, parse, read_line};
use crate::ops::Request;
use crate::protocol::{ErrorCode, KNOWN_OPS, Limits};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Keep failures in the output rather than in a file beside the
        // sources.
        failure_persistence: None,
        // A decoder that waits for bytes it does not need costs a timeout
        // per shrinking step; keep such a failure quick to report.
        max_shrink_time: 60_000,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// parse: what the protocol says a line gets
// ---------------------------------------------------------------------------

/// The codes in the protocol's error table (§10 of docs/protocol.md).
static DOCUMENTED_CODES: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    let protocol = include_str!("../../../docs/protocol.md");
    let section = protocol
        .split("\n## 10. Error codes")
        .nth(1)
        .expect("docs/protocol.md has its error table in §10");
    let table = section.split("\n## ").next().unwrap_or(section);
    let codes: Vec<_> = table
        .lines()
        .filter_map(|row| row.strip_prefix("| `")?.split('`').next())
        .collect();
    assert!(codes.len() >= 3, "no error codes found in §10: {codes:?}");
    codes
});

/// What §3 and §10 of the protocol say a line gets, worked out without
/// `parse`.
#[derive(Debug)]
enum Expected {
    /// Refused with this code, with this id.
    Refused(Value, ErrorCode),
    /// A known op: accepted as that op, or refused with `bad_request` when
    /// its fields are wrong. Either way the id is echoed.
    Known(Value, String),
}

fn expected(line: &[u8]) -> Expected {
    let Ok(value) = serde_json::from_slice::<Value>(line) else {
        return Expected::Refused(Value::Null, ErrorCode::BadJson);
    };
    let Value::Object(mut object) = value else {
        return Expected::Refused(Value::Null, ErrorCode::BadRequest);
    };
    let id = object.remove("id").unwrap_or(Value::Null);
    if id.is_array() || id.is_object() {
        return Expected::Refused(Value::Null, ErrorCode::BadRequest);
    }
    match object.remove("op") {
        Some(Value::String(op)) if KNOWN_OPS.contains(&op.as_str()) => Expected::Known(id, op),
        Some(Value::String(_)) => Expected::Refused(id, ErrorCode::UnknownOp),
        _ => Expected::Refused(id, ErrorCode::BadRequest),
    }
}

/// The op a parsed request is.
fn op_of(parsed: &Request) -> &'static str {
    parsed.name()
}

/// Parses `line` (which must not panic) and checks the answer against
/// [`expected`]. Returns the id the reply would carry.
fn check_parse(line: &[u8]) -> Result<Value, TestCaseError> {
    let outcome = parse(line);
    if std::str::from_utf8(line).is_err() {
        // §10: invalid UTF-8 is `bad_json`, whatever else the line holds.
        prop_assert!(
            matches!(&outcome, Err((Value::Null, error)) if error.code == ErrorCode::BadJson),
            "invalid UTF-8 must get bad_json with a null id"
        );
    }
    match (expected(line), outcome) {
        (expected, Err((id, error))) => {
            prop_assert!(
                DOCUMENTED_CODES.contains(&error.code.as_str()),
                "`{}` is not in the protocol's error table",
                error.code
            );
            prop_assert!(!error.message.is_empty());
            match expected {
                Expected::Refused(want_id, code) => {
                    prop_assert_eq!(error.code, code, "message: {}", error.message);
                    prop_assert_eq!(&id, &want_id);
                }
                Expected::Known(want_id, op) => {
                    prop_assert_eq!(
                        error.code,
                        ErrorCode::BadRequest,
                        "a known op `{}` refused: {}",
                        op,
                        error.message
                    );
                    prop_assert_eq!(&id, &want_id);
                }
            }
            Ok(id)
        }
        (Expected::Refused(_, code), Ok((_, parsed))) => Err(TestCaseError::fail(format!(
            "accepted as `{}` a line that should get `{code}`",
            op_of(&parsed)
        ))),
        (Expected::Known(want_id, op), Ok((id, parsed))) => {
            prop_assert_eq!(&id, &want_id);
            prop_assert_eq!(op_of(&parsed), op.as_str());
            Ok(id)
        }
    }
}

/// Whether the reply's id is the one sent. serde_json parses floats to
/// within an ulp or so (it is built without `float_roundtrip`), so a float
/// id may come back that close rather than bit for bit.
fn same_id(sent: &Value, echoed: &Value) -> bool {
    match (sent, echoed) {
        (Value::Number(a), Value::Number(b)) if a.is_f64() => match (a.as_f64(), b.as_f64()) {
            (Some(a), Some(b)) => a == b || a.to_bits().abs_diff(b.to_bits()) <= 2,
            _ => false,
        },
        _ => sent == echoed,
    }
}

// ---------------------------------------------------------------------------
// parse: strategies
// ---------------------------------------------------------------------------

/// Field names the requests use, and two the daemon keeps for itself.
const FIELDS: &[&str] = &[
    "topic",
    "key",
    "meta",
    "pid",
    "lifetime",
    "subscribe",
    "ref",
    "tokens",
    "client",
    "protocol",
    "since",
    "limit",
    "seq",
    "phx_ref",
];

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9:/._-]{1,12}",
        2 => any::<String>(),
        1 => Just(String::new()),
        // Around the 256-byte limit on names.
        1 => "[ -~]{255,258}",
        1 => prop::collection::vec(prop::char::range('\0', '\u{1f}'), 1..4)
            .prop_map(String::from_iter),
    ]
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("JSON has no NaN or infinity", |f| {
            Number::from_f64(f).map(Value::Number)
        }),
        text().prop_map(Value::String),
    ]
}

fn json() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((field_name(), inner), 0..6)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(FIELDS).prop_map(str::to_owned),
        1 => "[a-z_]{0,6}",
    ]
}

/// A field's value: often of a type some request wants, often not.
fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => "[a-z]{1,8}".prop_map(Value::from),
        1 => select(vec!["connection", "process", "thread"]).prop_map(Value::from),
        1 => select(vec![
            json!({}),
            json!({"a": 1}),
            json!({"seq": 1}),
            json!({"phx_ref": "x"}),
        ]),
        1 => prop::collection::vec("[a-f0-9]{0,64}".prop_map(Value::from), 0..3)
            .prop_map(Value::Array),
        1 => select(vec![
            -1,
            0,
            1,
            i64::from(u32::MAX),
            i64::from(u32::MAX) + 1,
            10_000,
            10_001,
        ])
        .prop_map(Value::from),
        2 => json(),
    ]
}

/// The fields a known op needs, so that a good share of random requests
/// are accepted.
fn minimal_fields(op: &str) -> Map<String, Value> {
    let fields = match op {
        "track" | "untrack" | "get_by_key" => json!({"topic": "t", "key": "k"}),
        "update" => json!({"topic": "t", "key": "k", "meta": {}}),
        "subscribe" | "unsubscribe" => json!({"topic": "t"}),
        "resume" => json!({"tokens": ["a", "b"]}),
        _ => json!({}),
    };
    match fields {
        Value::Object(fields) => fields,
        _ => unreachable!("the fields are an object"),
    }
}

/// `op`: a real one, a near miss, any text, any JSON, or none.
fn op_value() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        6 => select(KNOWN_OPS.to_vec()).prop_map(|op| Some(Value::from(op))),
        2 => (select(KNOWN_OPS.to_vec()), 0..5u8).prop_map(|(op, how)| {
            Some(Value::from(match how {
                0 => op.to_uppercase(),
                1 => format!("{op} "),
                2 => format!(" {op}"),
                3 => format!("{op}\0"),
                _ => op.replace('_', "-"),
            }))
        }),
        2 => text().prop_map(|op| Some(Value::from(op))),
        1 => json().prop_map(Some),
        1 => Just(None),
    ]
}

/// `id`: none, or a value of any JSON type.
fn id_value() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        1 => Just(None),
        6 => scalar().prop_map(Some),
        2 => json().prop_map(Some),
    ]
}

fn request_object() -> impl Strategy<Value = Map<String, Value>> {
    (
        op_value(),
        id_value(),
        any::<bool>(),
        prop::collection::vec((field_name(), field_value()), 0..6),
    )
        .prop_map(|(op, id, minimal, fields)| {
            let mut object = Map::new();
            if minimal && let Some(Value::String(op)) = &op {
                object.extend(minimal_fields(op));
            }
            object.extend(fields);
            if let Some(op) = op {
                object.insert("op".into(), op);
            }
            if let Some(id) = id {
                object.insert("id".into(), id);
            }
            object
        })
}

/// A number as text: any length of digits, fraction and exponent, some of
/// them beyond what f64 holds and some not JSON at all (leading zeros).
fn number_text() -> impl Strategy<Value = String> {
    (
        any::<bool>(),
        "[0-9]{1,400}",
        prop::option::of("[0-9]{1,40}"),
        prop::option::of("[eE][+-]?[0-9]{1,25}"),
    )
        .prop_map(|(negative, digits, fraction, exponent)| {
            let mut number = String::new();
            if negative {
                number.push('-');
            }
            number.push_str(&digits);
            if let Some(fraction) = fraction {
                number.push('.');
                number.push_str(&fraction);
            }
            number.push_str(&exponent.unwrap_or_default());
            number
        })
}

/// A string literal with escapes, good and bad, and raw non-ASCII.
fn string_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        3 => "[a-z ]{1,4}",
        1 => select(vec![
            "\\\"", "\\\\", "\\/", "\\b", "\\n", "\\u0000", "\\u00e9", "\\uD834\\uDD1E",
            "\\ud800", "\\udc00", "\\u12", "\\x", "é", "\u{1F600}", "\t", "\u{0}",
        ])
        .prop_map(str::to_owned),
    ];
    prop::collection::vec(piece, 0..6).prop_map(|pieces| format!("\"{}\"", pieces.concat()))
}

fn value_text() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => select(KNOWN_OPS.to_vec()).prop_map(|op| format!("\"{op}\"")),
        2 => number_text(),
        2 => string_text(),
        1 => select(vec![
            "null", "true", "false", "[]", "{}", "[1,\"a\"]", "{\"a\":{}}", "nul", "tru", "01",
            "1.", "-", "+1", ".5", "NaN", "Infinity", "1e400", "-1e400", "1e-400",
            "18446744073709551616", "-9223372036854775809", "-0",
        ])
        .prop_map(str::to_owned),
        1 => json().prop_map(|value| value.to_string()),
    ]
}

fn whitespace() -> impl Strategy<Value = &'static str> {
    select(vec!["", "", " ", "\t", "\r", " \r\n ", "\u{a0}"])
}

/// An object written by hand: keys may repeat (`op` and `id` often do),
/// values may be any text.
fn object_text() -> impl Strategy<Value = Vec<u8>> {
    let key = prop_oneof![
        3 => select(vec!["op", "id", "topic", "key", "meta", "pid", "tokens", "limit"])
            .prop_map(|key| format!("\"{key}\"")),
        1 => string_text(),
    ];
    (
        prop::collection::vec((whitespace(), key, whitespace(), value_text()), 0..8),
        whitespace(),
        any::<bool>(),
    )
        .prop_map(|(pairs, end, closed)| {
            let pairs: Vec<String> = pairs
                .into_iter()
                .map(|(before, key, after, value)| format!("{before}{key}{after}:{value}"))
                .collect();
            let close = if closed { "}" } else { "" };
            format!("{{{}{end}{close}", pairs.join(",")).into_bytes()
        })
}

#[derive(Debug, Clone)]
enum Mutation {
    Truncate(Index),
    Remove(Index),
    Replace(Index, u8),
    Insert(Index, &'static [u8]),
}

impl Mutation {
    fn apply(&self, bytes: &mut Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        match self {
            Mutation::Truncate(at) => bytes.truncate(at.index(bytes.len())),
            Mutation::Remove(at) => {
                bytes.remove(at.index(bytes.len()));
            }
            Mutation::Replace(at, byte) => {
                let at = at.index(bytes.len());
                bytes[at] = *byte;
            }
            Mutation::Insert(at, inserted) => {
                let at = at.index(bytes.len() + 1);
                bytes.splice(at..at, inserted.iter().copied());
            }
        }
    }
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let inserted: Vec<&'static [u8]> = vec![
        b"\xff",
        b"\x80",
        b"\xc0\x80",
        b"\xed\xa0\x80",
        b"\xf4\x90\x80\x80",
        b"\"",
        b"\\",
        b",",
        b":",
        b"{",
        b"}",
        b"[",
        b"]",
        b"\0",
        b"\r",
        b"1e999",
        b"\"id\":",
        b"\"op\":",
    ];
    prop_oneof![
        any::<Index>().prop_map(Mutation::Truncate),
        any::<Index>().prop_map(Mutation::Remove),
        (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Replace(at, byte)),
        (any::<Index>(), select(inserted)).prop_map(|(at, bytes)| Mutation::Insert(at, bytes)),
    ]
}

/// A random request, serialized and then damaged.
fn mutated_request() -> impl Strategy<Value = Vec<u8>> {
    (request_object(), prop::collection::vec(mutation(), 1..4)).prop_map(|(object, mutations)| {
        let mut bytes = Value::Object(object).to_string().into_bytes();
        for mutation in &mutations {
            mutation.apply(&mut bytes);
        }
        bytes
    })
}

/// Numbers of any size in the id and in a field, of a real op.
fn huge_numbers() -> impl Strategy<Value = Vec<u8>> {
    (
        number_text(),
        number_text(),
        select(vec![
            "id", "pid", "limit", "since", "protocol", "meta", "topic", "tokens",
        ]),
        select(KNOWN_OPS.to_vec()),
    )
        .prop_map(|(id, number, field, op)| {
            format!(r#"{{"id":{id},"op":"{op}","topic":"t","key":"k","{field}":{number}}}"#)
                .into_bytes()
        })
}

/// Arrays or objects nested up to well past serde_json's limit of 128,
/// alone, as the id, or inside a track's or an update's meta.
fn deep_nesting() -> impl Strategy<Value = Vec<u8>> {
    (0usize..300, any::<bool>(), 0..4u8, any::<bool>()).prop_map(
        |(depth, arrays, place, closed)| {
            let (open, close) = if arrays {
                ("[", "]")
            } else {
                (r#"{"a":"#, "}")
            };
            let closing = if closed { depth } else { depth / 2 };
            let nested = format!("{}1{}", open.repeat(depth), close.repeat(closing));
            match place {
                0 => nested,
                1 => format!(r#"{{"id":{nested},"op":"ping"}}"#),
                2 => format!(
                    r#"{{"id":7,"op":"track","topic":"t","key":"k","meta":{{"m":{nested}}}}}"#
                ),
                _ => format!(r#"{{"id":"x","op":"update","topic":"t","key":"k","meta":{nested}}}"#),
            }
            .into_bytes()
        },
    )
}

// ---------------------------------------------------------------------------
// read_line: a model of the framing and a run over a socket pair
// ---------------------------------------------------------------------------

/// What one call of the decoder gave.
#[derive(Debug, Clone, PartialEq)]
enum Read {
    Line(Vec<u8>),
    Eof,
    TooLong,
}

#[derive(Debug, Clone)]
struct Feed {
    max: usize,
    /// Lines as sent: the bytes before the ending, and whether the ending
    /// is `\r\n` rather than `\n`.
    lines: Vec<(Vec<u8>, bool)>,
    /// Bytes after the last newline.
    tail: Vec<u8>,
    /// Sizes of the writes, taken in turn.
    writes: Vec<usize>,
    /// The decoder's read buffer.
    capacity: usize,
    /// After a line that is too long, send every byte anyway and close;
    /// otherwise send only up to the byte that proves it too long and keep
    /// the connection open, so the decoder must answer without more.
    send_all: bool,
}

/// What the protocol's framing (§2) says the decoder gives for a feed.
struct Model {
    bytes: Vec<u8>,
    reads: Vec<Read>,
    /// How many of `bytes` to send.
    send: usize,
    /// Whether to close the sending side after them.
    close: bool,
    /// How far into the stream the decoder may have consumed when it
    /// returns for the last time.
    consumed_at_most: usize,
}

impl Feed {
    fn model(&self) -> Model {
        let mut bytes = Vec::new();
        for (content, crlf) in &self.lines {
            bytes.extend_from_slice(content);
            bytes.extend_from_slice(if *crlf { b"\r\n" } else { b"\n" });
        }
        bytes.extend_from_slice(&self.tail);

        let mut reads = Vec::new();
        // Where the line being read starts.
        let mut start = 0;
        for (content, crlf) in &self.lines {
            let mut line = content.clone();
            if *crlf {
                line.push(b'\r');
            }
            let next = start + line.len() + 1;
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.len() > self.max {
                reads.push(Read::TooLong);
                return self.stopped(bytes, reads, start);
            }
            reads.push(Read::Line(line));
            start = next;
        }
        // max + 2 bytes without a newline are too long even if a `\r\n`
        // came next; max + 1 might still be a full line and its `\r`.
        if self.tail.len() > self.max + 1 {
            reads.push(Read::TooLong);
            return self.stopped(bytes, reads, start);
        }
        reads.push(Read::Eof);
        Model {
            send: bytes.len(),
            close: true,
            consumed_at_most: bytes.len(),
            bytes,
            reads,
        }
    }

    /// The model of a feed whose line at `start` is too long: max + 2
    /// bytes of it (its newline included) prove it.
    fn stopped(&self, bytes: Vec<u8>, reads: Vec<Read>, start: usize) -> Model {
        let proof = start + self.max + 2;
        assert!(proof <= bytes.len());
        Model {
            send: if self.send_all { bytes.len() } else { proof },
            close: self.send_all,
            consumed_at_most: proof,
            bytes,
            reads,
        }
    }
}

/// What the decoder did with a feed.
struct Run {
    reads: Vec<Read>,
    /// The line buffer's length and capacity after each call.
    held: Vec<(usize, usize)>,
    /// How many bytes the decoder consumed from the stream in all.
    consumed: usize,
}

/// Feeds the model's bytes through a socket pair, in the feed's write
/// sizes, to `read_line` over a `BufReader` of the feed's capacity; calls
/// it until it says `Eof` or `TooLong`.
fn run(feed: &Feed, model: &Model) -> Result<Run, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let (ours, mut theirs) = tokio::net::UnixStream::pair().map_err(|e| e.to_string())?;
        let ours = ours.into_std().map_err(|e| e.to_string())?;
        let ours = Socket::new(ours.into()).map_err(|e| e.to_string())?;
        let recv = SocketReader::new(Arc::new(ours));
        let mut reader = BufReader::with_capacity(feed.capacity, recv);
        let (decoded, decoder_done) = tokio::sync::oneshot::channel::<()>();

        let write = async {
            let mut rest = &model.bytes[..model.send];
            for &size in feed.writes.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (now, later) = rest.split_at(size.min(rest.len()));
                theirs.write_all(now).await?;
                rest = later;
                // Let the decoder see a part before the next one comes.
                tokio::task::yield_now().await;
            }
            if !model.close {
                // Hold the connection open until the decoder has answered.
                let _ = decoder_done.await;
            }
            theirs.shutdown().await
        };

        let read = async {
            let decode = async {
                let mut reads = Vec::new();
                let mut held = Vec::new();
                let mut line = Vec::new();
                loop {
                    let read = read_line(&mut reader, &mut line, feed.max).await?;
                    held.push((line.len(), line.capacity()));
                    match read {
                        ReadLine::Line => reads.push(Read::Line(line.clone())),
                        ReadLine::Eof => {
                            reads.push(Read::Eof);
                            break;
                        }
                        ReadLine::TooLong => {
                            reads.push(Read::TooLong);
                            break;
                        }
                    }
                }
                Ok::<_, std::io::Error>((reads, held))
            };
            let decoded_result = tokio::time::timeout(Duration::from_secs(1), decode).await;
            drop(decoded);
            // Whatever the decoder left is what it did not consume.
            let mut rest = Vec::new();
            let drained = reader.read_to_end(&mut rest).await;
            (decoded_result, drained.map(|_| rest.len()))
        };

        let (written, (decoded, left)) = tokio::join!(write, read);
        written.map_err(|e| format!("write failed: {e}"))?;
        let (reads, held) = decoded
            .map_err(|_| {
                "read_line kept waiting though it had every byte it needed to answer".to_owned()
            })?
            .map_err(|e| format!("read failed: {e}"))?;
        let left = left.map_err(|e| format!("drain failed: {e}"))?;
        Ok(Run {
            reads,
            held,
            consumed: model.send - left,
        })
    })
}

fn check_decoder(feed: &Feed) -> Result<(), TestCaseError> {
    let model = feed.model();
    let run = run(feed, &model).map_err(TestCaseError::fail)?;
    prop_assert_eq!(&run.reads, &model.reads);
    for &(length, capacity) in &run.held {
        // The limit, plus the one byte that may be the `\r` of a `\r\n`.
        prop_assert!(
            length <= feed.max + 1,
            "held {length} bytes of a line; the limit is {}",
            feed.max
        );
        // Grown only to fit what it held, and never past the limit: a
        // Vec left to double would reach up to twice it.
        prop_assert!(
            capacity <= (feed.max + 1).max(8),
            "the line buffer grew to {capacity} bytes; the limit is {}",
            feed.max
        );
    }
    prop_assert!(
        run.consumed <= model.consumed_at_most,
        "consumed {} bytes; the answer was known after {}",
        run.consumed,
        model.consumed_at_most
    );
    if model.reads.last() == Some(&Read::Eof) {
        prop_assert_eq!(run.consumed, model.bytes.len());
    }
    Ok(())
}

/// A byte of a line: mostly printable, often `\r`, sometimes anything but
/// `\n`.
fn line_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => 0x20u8..0x7f,
        1 => Just(b'\r'),
        1 => any::<u8>().prop_map(|b| if b == b'\n' { b'\r' } else { b }),
    ]
}

/// Small limits, so that lines at, just over and well over the limit are
/// all common, split into writes and reads of every size.
fn small_feed() -> impl Strategy<Value = Feed> {
    (1usize..=40)
        .prop_flat_map(|max| {
            let content = move || {
                prop_oneof![
                    4 => prop::collection::vec(line_byte(), 0..=max),
                    2 => prop::collection::vec(line_byte(), max..=max + 2),
                    1 => prop::collection::vec(line_byte(), 0..=max + 3),
                ]
            };
            (
                Just(max),
                prop::collection::vec((content(), any::<bool>()), 0..8),
                prop_oneof![2 => Just(Vec::new()), 1 => content()],
                prop::collection::vec(1usize..=max + 3, 1..6),
                prop_oneof![3 => 1usize..=16, 1 => Just(8 * 1024)],
                any::<bool>(),
            )
        })
        .prop_map(|(max, lines, tail, writes, capacity, send_all)| Feed {
            max,
            lines,
            tail,
            writes,
            capacity,
            send_all,
        })
}

/// The daemon's own limit and read buffer, with lines around 64 KiB.
fn full_size_feed() -> impl Strategy<Value = Feed> {
    let max = Limits::default().max_line_bytes;
    let content = move || {
        (
            prop_oneof![
                1 => Just(0),
                3 => (max - 1)..=(max + 2),
                2 => 0..=max + 3000,
            ],
            any::<bool>(),
        )
            .prop_map(|(length, ends_in_cr)| {
                // A pattern, so that a misplaced byte shows.
                let mut content: Vec<u8> = (0..length).map(|i| b'a' + (i % 26) as u8).collect();
                if ends_in_cr && let Some(last) = content.last_mut() {
                    *last = b'\r';
                }
                content
            })
    };
    (
        prop::collection::vec((content(), any::<bool>()), 0..4),
        prop_oneof![1 => Just(Vec::new()), 1 => content()],
        prop::collection::vec(1usize..=20_000, 1..5),
        prop_oneof![3 => Just(8 * 1024), 1 => 512usize..=4096],
        any::<bool>(),
    )
        .prop_map(move |(lines, tail, writes, capacity, send_all)| Feed {
            max,
            lines,
            tail,
            writes,
            capacity,
            send_all,
        })
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

/// Every op the daemon knows, with the fields it needs, is accepted as that
/// op and echoes an id of every scalar type; an array or object id is
/// refused with `bad_request` and a null id however good the rest is.
#[test]
fn every_known_op_is_accepted_and_echoes_any_scalar_id() {
    let ids = [
        None,
        Some(Value::Null),
        Some(json!(true)),
        Some(json!(false)),
        Some(json!(0)),
        Some(json!(-1)),
        Some(json!(u64::MAX)),
        Some(json!(i64::MIN)),
        Some(json!(1.5)),
        Some(json!(-0.0)),
        Some(json!(1e300)),
        Some(json!("")),
        Some(json!("x")),
        Some(json!("\u{0}\n")),
    ];
    for &op in KNOWN_OPS {
        for id in &ids {
            let mut object = minimal_fields(op);
            object.insert("op".into(), op.into());
            if let Some(id) = id {
                object.insert("id".into(), id.clone());
            }
            let line = Value::Object(object).to_string();
            let (echoed, parsed) = parse(line.as_bytes())
                .unwrap_or_else(|(_, error)| panic!("`{line}` refused: {error}"));
            assert_eq!(op_of(&parsed), op, "{line}");
            assert!(
                same_id(id.as_ref().unwrap_or(&Value::Null), &echoed),
                "{line} echoed {echoed}"
            );
        }
        for id in [json!([1]), json!({"a": 1}), json!([])] {
            let mut object = minimal_fields(op);
            object.insert("op".into(), op.into());
            object.insert("id".into(), id);
            let line = Value::Object(object).to_string();
            match parse(line.as_bytes()) {
                Err((Value::Null, error)) => assert_eq!(error.code, ErrorCode::BadRequest),
                Err((id, _)) => panic!("`{line}` echoed {id}"),
                Ok(_) => panic!("`{line}` accepted"),
            }
        }
    }
}

/// The huge ids serde_json still reads (as floats) are echoed; the ones it
/// cannot (out of f64's range) make the line `bad_json`.
#[test]
fn huge_numeric_ids_are_echoed_or_make_the_line_bad_json() {
    let big = format!(r#"{{"id":{},"op":"ping"}}"#, "9".repeat(300));
    let (id, _) = parse(big.as_bytes()).unwrap_or_else(|(_, e)| panic!("{e}"));
    assert_eq!(id.as_f64(), Some(1e300));
    for line in [
        r#"{"id":1e400,"op":"ping"}"#,
        r#"{"id":-1e400,"op":"ping"}"#,
        r#"{"op":"ping","pid":1e999}"#,
    ] {
        match parse(line.as_bytes()) {
            Err((Value::Null, error)) => assert_eq!(error.code, ErrorCode::BadJson, "{line}"),
            _ => panic!("`{line}` should be bad_json with a null id"),
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// Any bytes at all, invalid UTF-8 included: no panic, and the answer
    /// and its id are what §3 and §10 say.
    #[test]
    fn parse_answers_any_bytes_as_the_protocol_says(
        line in prop::collection::vec(any::<u8>(), 0..300)
    ) {
        check_parse(&line)?;
    }

    /// Random request objects (real ops, near misses and garbage; fields
    /// of random types; ids of every JSON type): no panic, the answer is
    /// the documented one, and a scalar id comes back as it was sent.
    #[test]
    fn parse_answers_random_requests_and_echoes_their_id(object in request_object()) {
        let line = Value::Object(object.clone()).to_string();
        let echoed = check_parse(line.as_bytes())?;
        match object.get("id") {
            Some(Value::Array(_) | Value::Object(_)) => prop_assert_eq!(echoed, Value::Null),
            Some(id) => prop_assert!(same_id(id, &echoed), "sent {}, echoed {}", id, echoed),
            None => prop_assert_eq!(echoed, Value::Null),
        }
    }

    /// Objects written by hand (repeated keys, bad escapes, lone
    /// surrogates, odd whitespace, unclosed) and serialized requests with
    /// bytes removed, replaced or inserted (invalid UTF-8 among them).
    #[test]
    fn parse_answers_broken_json_as_the_protocol_says(
        line in prop_oneof![object_text(), mutated_request()]
    ) {
        check_parse(&line)?;
    }

    /// Numbers of hundreds of digits and huge exponents, in the id and in
    /// fields; nesting past serde_json's recursion limit, alone, as the id
    /// or inside meta.
    #[test]
    fn parse_survives_huge_numbers_and_deep_nesting(
        line in prop_oneof![huge_numbers(), deep_nesting()]
    ) {
        check_parse(&line)?;
    }

    /// Lines at, around and over a small limit, ended by `\n` or `\r\n`,
    /// with stray `\r`s and any bytes, split into writes and reads of every
    /// size: each line within the limit comes back exactly, the first one
    /// over it gives `TooLong` from its first max + 2 bytes alone (the
    /// connection held open, nothing more sent), a partial line at EOF is
    /// dropped, and the decoder never holds more than max + 1 bytes nor
    /// consumes past the byte that decided.
    #[test]
    fn read_line_returns_lines_as_sent_and_stops_at_the_first_too_long(feed in small_feed()) {
        check_decoder(&feed)?;
    }
}

proptest! {
    #![proptest_config(config(24))]

    /// The same at the daemon's own limit (64 KiB) and read buffer size.
    #[test]
    fn read_line_holds_to_the_default_limit(feed in full_size_feed()) {
        check_decoder(&feed)?;
    }
}
