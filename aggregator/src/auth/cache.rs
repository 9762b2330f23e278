//! A bounded map whose entries expire: review answers are reused briefly
//! so that every report does not cost a round trip to the API server.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use super::CacheSettings;

pub(super) struct Cache<V> {
    settings: CacheSettings,
    entries: Mutex<HashMap<String, (V, Instant)>>,
}

impl<V: Clone> Cache<V> {
    pub fn new(settings: CacheSettings) -> Self {
        Self {
            settings,
            entries: Mutex::default(),
        }
    }

    pub fn get(&self, key: &str) -> Option<V> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (v, at) = entries.get(key)?;
        (at.elapsed() < self.settings.ttl).then(|| v.clone())
    }

    /// Keeps `v`; when full, expired entries go first, then everything
    /// (a flood of distinct tokens costs reviews, never memory).
    pub fn put(&self, key: &str, v: V) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.settings.max_entries {
            let ttl = self.settings.ttl;
            entries.retain(|_, (_, at)| at.elapsed() < ttl);
            if entries.len() >= self.settings.max_entries {
                entries.clear();
            }
        }
        entries.insert(key.to_owned(), (v, Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn entries_expire_and_the_size_is_bounded() {
        let c = Cache::new(CacheSettings {
            ttl: Duration::from_millis(50),
            max_entries: 2,
        });
        c.put("a", 1);
        c.put("b", 2);
        assert_eq!(c.get("a"), Some(1));
        c.put("c", 3);
        assert!(c.entries.lock().unwrap().len() <= 2);
        assert_eq!(c.get("c"), Some(3));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(c.get("c"), None);
    }
}
