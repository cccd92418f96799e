//! A request's span in OTLP's protobuf form, written straight from the request's summary, and
//! the export body that carries a batch of them.
//!
//! The SDK's path builds a span object, copies every attribute into it, and on the export
//! thread converts each span into the generated protobuf types before encoding them: some 40
//! allocations and two copies of every string per request, about 5% of the gateway's CPU. A
//! request's span here is one buffer, encoded once from borrowed values; the export thread
//! only frames a batch of them. The messages and field numbers are those of
//! `opentelemetry/proto/trace/v1/trace.proto` and `common/v1/common.proto` (OTLP 1.x); a
//! unit test decodes what is written here with the generated types.

use std::time::SystemTime;

use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry::{Array, Value};
use opentelemetry_sdk::Resource;

/// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// One attribute value, borrowed.
#[derive(Debug, Clone, Copy)]
pub(super) enum Any<'a> {
    Str(&'a str),
    Int(i64),
    Float(f64),
    Bool(bool),
    Strs(&'a [String]),
}

/// Where the span's attributes are written: the SDK's key-values or protobuf.
pub(super) trait Attributes {
    fn put(&mut self, key: &'static str, value: Any<'_>);
}

/// Writes a span's attributes (field 9 of `Span`).
struct SpanAttributes<'a>(&'a mut Vec<u8>);

impl Attributes for SpanAttributes<'_> {
    fn put(&mut self, key: &'static str, value: Any<'_>) {
        key_value(self.0, 9, key, value);
    }
}

/// What a span is made of besides its attributes.
pub(super) struct SpanHead<'a> {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub name: &'a str,
    pub start: SystemTime,
    pub end: SystemTime,
    /// An error status's message; `None` leaves the status unset.
    pub error: Option<&'a str>,
}

/// `SpanKind.SPAN_KIND_SERVER`.
const KIND_SERVER: u64 = 2;
/// `StatusCode.STATUS_CODE_ERROR`.
const STATUS_ERROR: u64 = 2;
/// `SpanFlags`: sampled, and "whether the parent is remote is known" (there is no parent).
const FLAGS: u32 = 0x01 | 0x100;

/// Encodes one `Span` message (without its own tag and length), its attributes written by
/// `attributes`.
pub(super) fn span(head: &SpanHead, attributes: impl FnOnce(&mut dyn Attributes)) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    bytes_field(&mut out, 1, &head.trace_id.to_bytes());
    bytes_field(&mut out, 2, &head.span_id.to_bytes());
    bytes_field(&mut out, 5, head.name.as_bytes());
    varint_field(&mut out, 6, KIND_SERVER);
    fixed64_field(&mut out, 7, unix_nanos(head.start));
    fixed64_field(&mut out, 8, unix_nanos(head.end));
    attributes(&mut SpanAttributes(&mut out));
    if let Some(message) = head.error {
        // Status { message = 2; code = 3; }
        let len = len_field(message.len()) + 1 + varint_len(STATUS_ERROR);
        key(&mut out, 15, LEN);
        varint(&mut out, len as u64);
        bytes_field(&mut out, 2, message.as_bytes());
        varint_field(&mut out, 3, STATUS_ERROR);
    }
    key(&mut out, 16, FIXED32);
    out.extend_from_slice(&FLAGS.to_le_bytes());
    out
}

/// The parts of every export body that do not change: the resource and the scope.
pub(super) struct Frame {
    /// `Resource` message.
    resource: Vec<u8>,
    /// `InstrumentationScope` message.
    scope: Vec<u8>,
}

impl Frame {
    /// The frame for spans of `resource`, from the instrumentation scope `scope`.
    pub fn new(resource: &Resource, scope: &str) -> Frame {
        let mut encoded = Vec::new();
        for (name, value) in resource.iter() {
            match value {
                Value::String(s) => key_value(&mut encoded, 1, name.as_str(), Any::Str(s.as_str())),
                Value::I64(i) => key_value(&mut encoded, 1, name.as_str(), Any::Int(*i)),
                Value::F64(f) => key_value(&mut encoded, 1, name.as_str(), Any::Float(*f)),
                Value::Bool(b) => key_value(&mut encoded, 1, name.as_str(), Any::Bool(*b)),
                Value::Array(Array::String(list)) => {
                    let list: Vec<String> = list.iter().map(|s| s.as_str().to_string()).collect();
                    key_value(&mut encoded, 1, name.as_str(), Any::Strs(&list))
                }
                other => key_value(&mut encoded, 1, name.as_str(), Any::Str(&other.to_string())),
            }
        }
        let mut scope_message = Vec::new();
        bytes_field(&mut scope_message, 1, scope.as_bytes());
        Frame {
            resource: encoded,
            scope: scope_message,
        }
    }

    /// An `ExportTraceServiceRequest` carrying `spans` (each a `Span` message).
    pub fn export_body(&self, spans: &[Vec<u8>]) -> Vec<u8> {
        let spans_len: usize = spans.iter().map(|s| len_field(s.len())).sum();
        let scope_spans = len_field(self.scope.len()) + spans_len;
        let resource_spans = len_field(self.resource.len()) + len_field(scope_spans);
        let mut out = Vec::with_capacity(len_field(resource_spans));
        // ExportTraceServiceRequest.resource_spans = 1
        key(&mut out, 1, LEN);
        varint(&mut out, resource_spans as u64);
        // ResourceSpans.resource = 1, .scope_spans = 2
        bytes_field(&mut out, 1, &self.resource);
        key(&mut out, 2, LEN);
        varint(&mut out, scope_spans as u64);
        // ScopeSpans.scope = 1, .spans = 2
        bytes_field(&mut out, 1, &self.scope);
        for span in spans {
            bytes_field(&mut out, 2, span);
        }
        out
    }
}

fn unix_nanos(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A `KeyValue` message as field `field` of the message being written.
fn key_value(out: &mut Vec<u8>, field: u32, name: &str, value: Any<'_>) {
    let value_len = any_len(value);
    key(out, field, LEN);
    varint(out, (len_field(name.len()) + len_field(value_len)) as u64);
    bytes_field(out, 1, name.as_bytes());
    key(out, 2, LEN);
    varint(out, value_len as u64);
    any(out, value);
}

/// The length of an `AnyValue` message.
fn any_len(value: Any<'_>) -> usize {
    match value {
        Any::Str(s) => len_field(s.len()),
        Any::Int(i) => 1 + varint_len(i as u64),
        Any::Float(_) => 1 + 8,
        Any::Bool(_) => 2,
        Any::Strs(list) => len_field(strs_len(list)),
    }
}

/// The length of an `ArrayValue` of strings.
fn strs_len(list: &[String]) -> usize {
    list.iter().map(|s| len_field(len_field(s.len()))).sum()
}

/// An `AnyValue` message: string_value = 1, bool_value = 2, int_value = 3, double_value = 4,
/// array_value = 5.
fn any(out: &mut Vec<u8>, value: Any<'_>) {
    match value {
        Any::Str(s) => bytes_field(out, 1, s.as_bytes()),
        Any::Bool(b) => varint_field(out, 2, u64::from(b)),
        Any::Int(i) => varint_field(out, 3, i as u64),
        Any::Float(f) => {
            key(out, 4, FIXED64);
            out.extend_from_slice(&f.to_le_bytes());
        }
        Any::Strs(list) => {
            key(out, 5, LEN);
            varint(out, strs_len(list) as u64);
            // ArrayValue.values = 1, each an AnyValue holding a string.
            for s in list {
                key(out, 1, LEN);
                varint(out, len_field(s.len()) as u64);
                bytes_field(out, 1, s.as_bytes());
            }
        }
    }
}

/// The bytes a length-delimited field of `n` bytes takes (its field number below 16).
fn len_field(n: usize) -> usize {
    1 + varint_len(n as u64) + n
}

fn varint_len(v: u64) -> usize {
    // 7 bits per byte; 0 takes one.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    key(out, field, VARINT);
    varint(out, v);
}

fn fixed64_field(out: &mut Vec<u8>, field: u32, v: u64) {
    key(out, field, FIXED64);
    out.extend_from_slice(&v.to_le_bytes());
}

fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(out, field, LEN);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::KeyValue;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Decoded;
    use prost::Message as _;
    use std::time::Duration;

    fn decoded_value(kv: &opentelemetry_proto::tonic::common::v1::KeyValue) -> Decoded {
        kv.value
            .as_ref()
            .and_then(|v| v.value.clone())
            .expect("a value")
    }

    #[test]
    fn spans_and_their_frame_decode_as_otlp_with_every_value_intact() {
        let long_path = "/p".repeat(200);
        let policies = vec!["allowlist".to_string(), "reads".to_string()];
        let start = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let head = SpanHead {
            trace_id: TraceId::from_bytes([7; 16]),
            span_id: SpanId::from_bytes([9; 8]),
            name: "GET",
            start,
            end: start + Duration::from_micros(900),
            error: Some("denied"),
        };
        let encoded = span(&head, |a| {
            a.put("url.path", Any::Str(&long_path));
            a.put("http.response.status_code", Any::Int(403));
            a.put("negative", Any::Int(-5));
            a.put("tollgate.latency_ms", Any::Float(0.9));
            a.put("flag", Any::Bool(true));
            a.put("tollgate.policies", Any::Strs(&policies));
            a.put("empty", Any::Str(""));
        });
        let resource = Resource::builder_empty()
            .with_attribute(KeyValue::new("service.name", "tollgate"))
            .with_attribute(KeyValue::new("process.pid", 42_i64))
            .build();
        let frame = Frame::new(&resource, "tollgate");
        let body = frame.export_body(&[encoded.clone(), encoded]);

        let request = ExportTraceServiceRequest::decode(&body[..]).expect("decodes");
        assert_eq!(request.resource_spans.len(), 1);
        let resource_spans = &request.resource_spans[0];
        let attributes = &resource_spans
            .resource
            .as_ref()
            .expect("resource")
            .attributes;
        let service = attributes
            .iter()
            .find(|kv| kv.key == "service.name")
            .expect("name");
        assert_eq!(
            decoded_value(service),
            Decoded::StringValue("tollgate".into())
        );
        let pid = attributes
            .iter()
            .find(|kv| kv.key == "process.pid")
            .expect("pid");
        assert_eq!(decoded_value(pid), Decoded::IntValue(42));
        let scope_spans = &resource_spans.scope_spans[0];
        assert_eq!(scope_spans.scope.as_ref().expect("scope").name, "tollgate");
        assert_eq!(scope_spans.spans.len(), 2);
        let s = &scope_spans.spans[0];
        assert_eq!(s.trace_id, vec![7; 16]);
        assert_eq!(s.span_id, vec![9; 8]);
        assert_eq!(s.name, "GET");
        assert_eq!(s.kind, 2);
        assert_eq!(s.start_time_unix_nano, 1_700_000_000_123_456_789);
        assert_eq!(s.end_time_unix_nano, 1_700_000_000_124_356_789);
        assert_eq!(s.flags, 0x101);
        let status = s.status.as_ref().expect("status");
        assert_eq!((status.code, status.message.as_str()), (2, "denied"));
        let get =
            |key: &str| decoded_value(s.attributes.iter().find(|kv| kv.key == key).expect(key));
        assert_eq!(get("url.path"), Decoded::StringValue(long_path.clone()));
        assert_eq!(get("http.response.status_code"), Decoded::IntValue(403));
        assert_eq!(get("negative"), Decoded::IntValue(-5));
        assert_eq!(get("tollgate.latency_ms"), Decoded::DoubleValue(0.9));
        assert_eq!(get("flag"), Decoded::BoolValue(true));
        assert_eq!(get("empty"), Decoded::StringValue(String::new()));
        match get("tollgate.policies") {
            Decoded::ArrayValue(list) => assert_eq!(
                list.values
                    .iter()
                    .map(|v| v.value.clone())
                    .collect::<Vec<_>>(),
                vec![
                    Some(Decoded::StringValue("allowlist".into())),
                    Some(Decoded::StringValue("reads".into()))
                ]
            ),
            other => panic!("policies: {other:?}"),
        }
    }

    #[test]
    fn an_unset_status_is_left_out_and_varint_lengths_are_exact() {
        let head = SpanHead {
            trace_id: TraceId::from_bytes([1; 16]),
            span_id: SpanId::from_bytes([2; 8]),
            name: "POST",
            start: SystemTime::UNIX_EPOCH,
            end: SystemTime::UNIX_EPOCH,
            error: None,
        };
        let encoded = span(&head, |_| {});
        let decoded =
            opentelemetry_proto::tonic::trace::v1::Span::decode(&encoded[..]).expect("decodes");
        assert!(decoded.status.is_none());
        for v in [0, 1, 127, 128, 16_383, 16_384, u64::MAX] {
            let mut out = Vec::new();
            varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
        }
    }
}
