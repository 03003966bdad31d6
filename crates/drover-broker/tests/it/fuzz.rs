//! Fuzz targets (see FUZZING.md): the MQTT 5 packet reading the broker does on every
//! connection (`Packet::read` with the broker's maximum packet size), the topic and filter
//! checks, and the subscription trie against plain topic matching.

#[path = "../../../../fuzz/driver.rs"]
mod driver;

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::BytesMut;
use driver::Fuzz;
use drover_broker::{Subscriber, Trie, read_packet, topic_matches, valid_filter, valid_topic};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;

/// The broker's default `max_packet_size`, and a small one so that the limit itself is hit.
const MAX: u32 = 1024 * 1024;

/// Hand-written MQTT 5 packets: each kind a client sends, with and without properties.
fn packet_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = vec![
        // CONNECT, clean start, keep-alive 60, client id "dev".
        vec![0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 3, b'd', b'e', b'v'],
        // CONNECT with a will (topic "t", payload "x") and a session-expiry property.
        vec![
            0x10, 27, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x06, 0, 60, 5, 0x11, 0, 0, 0, 10, 0, 3, b'd', b'e', b'v', 0, 0,
            1, b't', 0, 1, b'x',
        ],
        // PUBLISH QoS 1 to a/b/c, packet id 1, payload "hi".
        vec![0x32, 12, 0, 5, b'a', b'/', b'b', b'/', b'c', 0, 1, 0, b'h', b'i'],
        // PUBLISH QoS 0, retained, with payload-format and topic-alias properties.
        vec![0x31, 13, 0, 3, b'x', b'/', b'y', 5, 0x01, 0x01, 0x23, 0, 2, b'o', b'k'],
        // SUBSCRIBE a/# QoS 1, packet id 2.
        vec![0x82, 9, 0, 2, 0, 0, 3, b'a', b'/', b'#', 1],
        // SUBSCRIBE $share/g/a/+ with a subscription identifier.
        vec![0x82, 18, 0, 3, 2, 0x0b, 7, 0, 10, b'$', b's', b'h', b'a', b'r', b'e', b'/', b'g', b'/', b'+', 0x2d],
        // UNSUBSCRIBE a/+.
        vec![0xa2, 8, 0, 4, 0, 0, 3, b'a', b'/', b'+'],
        vec![0xc0, 0],                // PINGREQ
        vec![0xe0, 0],                // DISCONNECT
        vec![0xe0, 2, 0x04, 0],       // DISCONNECT with will
        vec![0x40, 2, 0, 1],          // PUBACK
        vec![0x40, 4, 0, 1, 0x10, 0], // PUBACK, reason "no matching subscribers"
    ];
    // The remaining length (one byte: every seed is short) computed, not counted by hand.
    for s in &mut seeds {
        s[1] = (s.len() - 2) as u8;
    }
    let all: Vec<u8> = seeds.concat();
    seeds.push(all);
    seeds
}

#[test]
fn mqtt_packet_read() {
    let seeds = packet_seeds();
    for s in &seeds[..seeds.len() - 1] {
        let mut b = BytesMut::from(&s[..]);
        let p = read_packet(&mut b, MAX).unwrap_or_else(|e| panic!("seed {s:?}: {e:?}"));
        assert!(p.is_some() && b.is_empty(), "seed {s:?}: {p:?}, {} bytes left", b.len());
    }
    Fuzz::new("broker_mqtt_packet_read")
        .seeds(&seeds)
        .dict([&[0xff, 0xff, 0xff, 0x7f][..], &[0x80, 0x80, 0x80, 0x80, 0x01], b"$share/", b"/#", b"+", b"\0"])
        .max_len(128 * 1024)
        .run(|data| {
            // The first byte picks the limit: the broker's, or a small one.
            let Some((&pick, data)) = data.split_first() else { return };
            let max = if pick & 1 == 0 { MAX } else { 64 };
            let mut buf = BytesMut::from(data);
            // As the connection does: packets one after another until one is incomplete or bad.
            while !buf.is_empty() {
                let before = buf.len();
                let Ok(Some(p)) = read_packet(&mut buf, max) else { break };
                assert!(buf.len() < before, "a packet was read without consuming bytes");
                assert!(before - buf.len() <= max as usize + 5, "a packet over the limit was read");
                check_packet(&p);
            }
        });
}

/// What the broker does with a packet's names, and a write/read round trip.
fn check_packet(p: &Packet) {
    match p {
        Packet::Publish(publish) => {
            if let Ok(t) = std::str::from_utf8(&publish.topic)
                && valid_topic(t)
            {
                assert!(!t.contains(['+', '#']));
            }
        }
        Packet::Subscribe(s) => {
            for f in &s.filters {
                if valid_filter(&f.path) {
                    // A valid filter matches the topic made of its own literal levels.
                    let literal: String = f.path.replace(['+', '#'], "x");
                    if !literal.starts_with('$') {
                        assert!(topic_matches(&literal, &f.path), "{:?} does not match {literal:?}", f.path);
                    }
                }
            }
        }
        Packet::Unsubscribe(u) => {
            for f in &u.filters {
                let _ = valid_filter(f);
            }
        }
        _ => {}
    }
    // rumqttc writes a DISCONNECT without properties and with a reason other than 0 as a
    // malformed packet (a stray property length after it); the broker always sends properties.
    if matches!(p, Packet::Disconnect(d) if d.properties.is_none()) {
        return;
    }
    // The broker clears a client's subscription identifiers before it forwards a publish
    // (clients may not send them; rumqttc mis-sizes several of them when writing).
    let mut p = p.clone();
    if let Packet::Publish(publish) = &mut p
        && let Some(props) = publish.properties.as_mut()
    {
        props.subscription_identifiers.clear();
        // Empty properties are written as none.
        if *props == Default::default() {
            publish.properties = None;
        }
    }
    let p = &p;
    // What was read writes back, and reads back to the same packet.
    let mut out = BytesMut::new();
    if p.write(&mut out, None).is_ok() {
        // (rumqttc writes a plain DISCONNECT in the short form its own reader refuses.)
        let again = read_packet(&mut out, u32::MAX).expect("a written packet reads back");
        assert_eq!(again.as_ref(), Some(p));
        assert!(out.is_empty());
    }
}

fn sub(client: &str) -> Subscriber {
    Subscriber {
        client: Arc::from(client),
        conn: 1,
        qos: QoS::AtLeastOnce,
        no_local: false,
        retain_as_published: false,
        share: None,
    }
}

/// Lines of text: `+filter` subscribes, `-filter` unsubscribes, anything else is a topic
/// that must reach exactly the clients whose filters match it.
#[test]
fn trie_matches_like_topic_matches() {
    let seed = "+a/b\n+a/+\n+a/#\n+#\n+$SYS/#\n++/b\n-a/+\na/b\na\n$SYS/x\n/\n+/\n//\na//b\n+a//#\n";
    Fuzz::new("broker_trie").seed(seed).dict(["\n+", "\n-", "\n", "/", "+", "#", "$", "a", "b"]).max_len(4096).run(
        |data| {
            let text = String::from_utf8_lossy(data);
            let mut trie = Trie::default();
            let mut filters: BTreeSet<String> = BTreeSet::new();
            for line in text.lines() {
                if let Some(f) = line.strip_prefix('+') {
                    if valid_filter(f) {
                        // One client per filter, named by it.
                        let replaced = trie.insert(f, sub(f));
                        assert_eq!(replaced, !filters.insert(f.to_string()), "insert {f:?}");
                    }
                } else if let Some(f) = line.strip_prefix('-') {
                    if valid_filter(f) {
                        let removed = trie.remove(f, f, None, None);
                        assert_eq!(removed, filters.remove(f), "remove {f:?}");
                    }
                } else if valid_topic(line) {
                    let mut got = BTreeSet::new();
                    trie.matches(line, |s| {
                        got.insert(s.client.to_string());
                    });
                    let want: BTreeSet<String> = filters.iter().filter(|f| topic_matches(line, f)).cloned().collect();
                    assert_eq!(got, want, "topic {line:?}");
                }
                assert_eq!(trie.len(), filters.len());
            }
        },
    );
}
