//! Subscriptions indexed by topic level, so routing one message costs its topic's depth, not
//! the number of subscriptions (a fleet has one or more per device).

use std::collections::HashMap;
use std::sync::Arc;

use rumqttc::v5::mqttbytes::QoS;

/// One subscription of one client.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub client: Arc<str>,
    /// The connection that made it: a reconnected client's old subscriptions are not its own.
    pub conn: u64,
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// `Some(group)` for `$share/{group}/…`.
    pub share: Option<Arc<str>>,
}

#[derive(Default, Debug)]
struct Node {
    children: HashMap<Box<str>, Node>,
    plus: Option<Box<Node>>,
    /// Subscribers whose filter ends here.
    here: Vec<Subscriber>,
    /// Subscribers whose filter ends here with `/#` (they also match this level itself).
    hash: Vec<Subscriber>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.plus.is_none() && self.here.is_empty() && self.hash.is_empty()
    }
}

#[derive(Default, Debug)]
pub struct Trie {
    root: Node,
    len: usize,
}

fn same(a: &Subscriber, client: &str, share: Option<&str>) -> bool {
    &*a.client == client && a.share.as_deref() == share
}

impl Trie {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds or replaces `sub.client`'s subscription to `filter` (in the same share group).
    /// Returns true when it replaced one.
    pub fn insert(&mut self, filter: &str, sub: Subscriber) -> bool {
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" {
                return Self::put(&mut node.hash, sub, &mut self.len);
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Default::default)
            } else {
                node.children.entry(level.into()).or_default()
            };
            if levels.peek().is_none() {
                return Self::put(&mut node.here, sub, &mut self.len);
            }
        }
        false
    }

    fn put(list: &mut Vec<Subscriber>, sub: Subscriber, len: &mut usize) -> bool {
        if let Some(existing) = list.iter_mut().find(|s| same(s, &sub.client, sub.share.as_deref())) {
            *existing = sub;
            true
        } else {
            list.push(sub);
            *len += 1;
            false
        }
    }

    /// Removes `client`'s subscription to `filter`; with `conn`, only if that connection made it.
    pub fn remove(&mut self, filter: &str, client: &str, share: Option<&str>, conn: Option<u64>) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = Self::remove_at(&mut self.root, &levels, client, share, conn);
        if removed {
            self.len -= 1;
        }
        removed
    }

    fn remove_at(node: &mut Node, levels: &[&str], client: &str, share: Option<&str>, conn: Option<u64>) -> bool {
        let take = |list: &mut Vec<Subscriber>| {
            let before = list.len();
            list.retain(|s| !(same(s, client, share) && conn.is_none_or(|c| s.conn == c)));
            before != list.len()
        };
        let Some((level, rest)) = levels.split_first() else { return false };
        if *level == "#" {
            return take(&mut node.hash);
        }
        let (removed, now_empty) = if *level == "+" {
            let Some(child) = node.plus.as_deref_mut() else { return false };
            let removed =
                if rest.is_empty() { take(&mut child.here) } else { Self::remove_at(child, rest, client, share, conn) };
            (removed, child.is_empty())
        } else {
            let Some(child) = node.children.get_mut(*level) else { return false };
            let removed =
                if rest.is_empty() { take(&mut child.here) } else { Self::remove_at(child, rest, client, share, conn) };
            (removed, child.is_empty())
        };
        if now_empty {
            if *level == "+" {
                node.plus = None;
            } else {
                node.children.remove(*level);
            }
        }
        removed
    }

    /// Every subscription matching `topic`, calling `f` for each. Topics starting with `$` are
    /// not matched by filters starting with a wildcard (MQTT 5, 4.7.2).
    pub fn matches(&self, topic: &str, mut f: impl FnMut(&Subscriber)) {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        Self::walk(&self.root, &levels, true, dollar, &mut f);
    }

    fn walk(node: &Node, levels: &[&str], first: bool, dollar: bool, f: &mut impl FnMut(&Subscriber)) {
        let wild_ok = !(first && dollar);
        if wild_ok {
            node.hash.iter().for_each(&mut *f);
        }
        let Some((level, rest)) = levels.split_first() else {
            node.here.iter().for_each(f);
            return;
        };
        if let Some(child) = node.children.get(*level) {
            Self::walk(child, rest, false, dollar, f);
        }
        if wild_ok && let Some(child) = node.plus.as_deref() {
            Self::walk(child, rest, false, dollar, f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(client: &str) -> Subscriber {
        Subscriber {
            client: client.into(),
            conn: 1,
            qos: QoS::AtLeastOnce,
            no_local: false,
            retain_as_published: false,
            share: None,
        }
    }

    fn who(t: &Trie, topic: &str) -> Vec<String> {
        let mut v = Vec::new();
        t.matches(topic, |s| v.push(s.client.to_string()));
        v.sort();
        v
    }

    #[test]
    fn wildcards_match_as_mqtt_says() {
        let mut t = Trie::default();
        t.insert("a/b/c", sub("exact"));
        t.insert("a/+/c", sub("plus"));
        t.insert("a/#", sub("hash"));
        t.insert("#", sub("all"));
        t.insert("a/b", sub("short"));
        assert_eq!(who(&t, "a/b/c"), ["all", "exact", "hash", "plus"]);
        assert_eq!(who(&t, "a/b"), ["all", "hash", "short"]);
        // `a/#` matches its parent level too.
        assert_eq!(who(&t, "a"), ["all", "hash"]);
        assert_eq!(who(&t, "a/x/c/d"), ["all", "hash"]);
        // `$` topics are not seen by leading wildcards.
        t.insert("$SYS/#", sub("sys"));
        assert_eq!(who(&t, "$SYS/x"), ["sys"]);
        assert_eq!(t.len(), 6);
    }

    #[test]
    fn remove_prunes_and_respects_connection() {
        let mut t = Trie::default();
        t.insert("a/+/c", sub("x"));
        assert!(t.insert("a/+/c", sub("x")), "same client and filter replaces");
        assert_eq!(t.len(), 1);
        assert!(!t.remove("a/+/c", "x", None, Some(2)), "another connection's entry stays");
        assert!(t.remove("a/+/c", "x", None, Some(1)));
        assert!(t.is_empty());
        assert!(t.root.is_empty(), "empty branches are pruned");
        assert!(!t.remove("a/+/c", "x", None, None));
    }
}
