//! Fuzz targets of the wire contract, run for `DROVER_FUZZ_SECS` each (default 2): the
//! filter parser, the remote-access frame codec and the device uplink decoders. See FUZZING.md.

#[path = "../../../fuzz/driver.rs"]
mod driver;

use driver::Fuzz;
use drover_proto::device::{Channel, Uplink, decode_uplink};
use drover_proto::{filter, remote};

/// Every `code span` and fenced block line of a Markdown document.
fn md_snippets(md: &str) -> Vec<String> {
    let mut out: Vec<String> = md.split('`').skip(1).step_by(2).filter(|s| !s.is_empty()).map(String::from).collect();
    out.extend(
        md.lines().filter(|l| l.starts_with('{') || l.contains(" and ") || l.contains(" or ")).map(String::from),
    );
    out
}

#[test]
fn filter_parse() {
    let seeds = md_snippets(include_str!("../../../docs/filters.md"));
    let valid = seeds.iter().filter(|s| filter::parse(s).is_ok()).count();
    assert!(valid >= 10, "only {valid} of docs/filters.md's examples parse");
    Fuzz::new("filter_parse")
        .seeds(&seeds)
        .dict([
            " and ",
            " or ",
            " not ",
            "(",
            ")",
            " in (",
            "\"",
            "\\\"",
            " exists",
            " ~ ",
            " = ",
            " != ",
            "tag.",
            "attr.",
            "artifact.commit",
            "online",
            "status",
            "group",
            "*",
        ])
        .max_len(filter::MAX_FILTER_LEN + 64)
        .run(|data| {
            let s = String::from_utf8_lossy(data);
            match filter::parse(&s) {
                // Deterministic: the same text parses to the same expression.
                Ok(e) => assert_eq!(filter::parse(&s).unwrap(), e),
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        });
}

#[test]
fn remote_frame_decode() {
    use remote::{FrameType, Header};
    let mut seeds = Vec::new();
    for t in 0..=16u8 {
        if let Some(kind) = FrameType::from_u8(t) {
            let stream = if kind == FrameType::Control { 0 } else { 3 };
            seeds.push(remote::encode(Header { kind, stream, seq: 7, credit: 4096 }, b"hi"));
            seeds.push(remote::encode(Header::new(kind, stream, 0), &remote::resize_payload(24, 80)));
        }
    }
    assert!(seeds.len() >= 8);
    Fuzz::new("remote_frame_decode").seeds(&seeds).max_len(remote::MAX_FRAME_DATA + 64).run(|data| {
        if let Ok(f) = remote::decode(data) {
            // Round trip: a frame that decodes encodes back to the same bytes.
            assert_eq!(remote::encode(f.header, f.payload), data);
            if f.header.kind == FrameType::Resize {
                let _ = remote::parse_resize(f.payload);
            }
        }
    });
}

/// A stream of frames (each prefixed by a one-byte length) through the flow control.
#[test]
fn remote_frame_flow() {
    use remote::{FrameType, Header, SessionFlow, StreamFlow};
    let mut seed = Vec::new();
    for (i, (kind, stream, credit, payload)) in [
        (FrameType::Open, 1u16, 0u32, &b"{}"[..]),
        (FrameType::Data, 1, 0, b"abc"),
        (FrameType::Data, 1, 100, b"d"),
        (FrameType::Control, 0, 32, b""),
        (FrameType::Eof, 1, 0, b""),
    ]
    .into_iter()
    .enumerate()
    {
        let f = remote::encode(Header { kind, stream, seq: i as u32, credit }, payload);
        seed.push(f.len() as u8);
        seed.extend(f);
    }
    Fuzz::new("remote_frame_flow").seed(&seed).run(|data| {
        let mut session = SessionFlow::new();
        let mut streams = std::collections::HashMap::<u16, StreamFlow>::new();
        let mut rest = data;
        while let Some((&n, tail)) = rest.split_first() {
            let (frame, tail) = tail.split_at((n as usize).min(tail.len()));
            rest = tail;
            let Ok(f) = remote::decode(frame) else { continue };
            if session.on_frame(&f.header).is_err() {
                break;
            }
            if f.header.stream != 0 {
                let s = streams.entry(f.header.stream).or_default();
                let _ = s.on_credit(f.header.stream, f.header.credit);
                if f.header.kind == FrameType::Data && s.on_received(f.header.stream, f.payload.len()).is_ok() {
                    s.on_consumed(f.payload.len());
                    let _ = s.take_grant(true);
                }
                assert!(s.sendable() <= remote::MAX_FRAME_DATA);
            }
            let _ = session.take_grant();
        }
    });
}

/// The inner message of an uplink, as JSON again.
fn reencode(u: &Uplink) -> Vec<u8> {
    match u {
        Uplink::Status(m) => serde_json::to_vec(m),
        Uplink::Hello(m) => serde_json::to_vec(m),
        Uplink::Inventory(m) => serde_json::to_vec(m),
        Uplink::Heartbeat(m) => serde_json::to_vec(m),
        Uplink::UpdateReport(m) => serde_json::to_vec(m),
        Uplink::Telemetry(m) => serde_json::to_vec(m),
        Uplink::Logs(m) => serde_json::to_vec(m),
    }
    .unwrap()
}

#[test]
fn device_decode_uplink() {
    let docs = include_str!("../../../docs/protocol.md");
    let mut seeds: Vec<Vec<u8>> = docs.lines().filter(|l| l.starts_with('{')).map(|l| l.as_bytes().to_vec()).collect();
    // Each seed tagged with every channel: the first byte picks the channel.
    let examples = seeds.len();
    let decoded = seeds.iter().filter(|s| Channel::ALL.iter().any(|c| decode_uplink(*c, s).is_ok())).count();
    assert!(examples >= 10 && decoded >= 6, "{decoded} of docs/protocol.md's {examples} examples decode");
    seeds = seeds.iter().flat_map(|s| (0..Channel::ALL.len() as u8).map(move |c| [&[c][..], s].concat())).collect();
    Fuzz::new("device_decode_uplink")
        .seeds(&seeds)
        .dict([
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "\"",
            "null",
            "true",
            "-1",
            "1e308",
            "0.5",
            "18446744073709551616",
            "\"v\":1",
            "\"\\u0000\"",
            "\"\\ud800\"",
            "{\"a\":",
            "[[[[[[[[",
        ])
        .max_len(256 * 1024)
        .run(|data| {
            let Some((&c, payload)) = data.split_first() else { return };
            let channel = Channel::ALL[c as usize % Channel::ALL.len()];
            if let Ok(u) = decode_uplink(channel, payload) {
                // What was accepted re-encodes to a message that decodes to the same thing
                // (for telemetry values, within a few ULP: serde_json's default float parser
                // is not always correctly rounded; see FUZZING.md).
                let again = decode_uplink(channel, &reencode(&u)).expect("a re-encoded message decodes");
                match (&again, &u) {
                    (Uplink::Telemetry(a), Uplink::Telemetry(b)) => {
                        assert_eq!((a.v, a.seq, &a.events, a.dropped), (b.v, b.seq, &b.events, b.dropped));
                        assert_eq!(a.points.len(), b.points.len());
                        for (x, y) in a.points.iter().zip(&b.points) {
                            assert_eq!((&x.n, x.t), (&y.n, y.t));
                            assert!((x.v - y.v).abs() <= 1e-14 * x.v.abs().max(y.v.abs()), "{} became {}", y.v, x.v);
                        }
                    }
                    _ => assert_eq!(again, u),
                }
            }
        });
}
