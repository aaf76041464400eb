//! HTTP basic authentication against bcrypt hashes, as the Prometheus exporter toolkit does it,
//! with its costs bounded for a daemon that shares the host with the platform:
//! - a verified (user, password) is remembered (as a SHA-256 of user, password and hash, never
//!   the password), so a scraper pays bcrypt once, not every 15 seconds;
//! - every other attempt runs bcrypt one at a time on the blocking pool, and at most
//!   [`BCRYPT_PER_SECOND`] a second: a flood of wrong passwords gets 429 and costs a fraction of
//!   one core, while scrapers already verified are still answered;
//! - an unknown user is checked against a dummy hash of the same cost, so the answer's timing
//!   does not say which users exist.

use std::collections::{BTreeMap, HashSet};
use std::num::NonZeroU32;
use std::sync::Mutex;

use base64::Engine as _;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;

/// bcrypt verifications of unremembered credentials per second, at most.
pub const BCRYPT_PER_SECOND: u32 = 4;

/// Verified credentials remembered; the set is emptied when it is full (only correct passwords
/// enter it, so only the configured users' scrapers can fill it).
const REMEMBERED_MAX: usize = 256;

/// The answer to one request's credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Granted,
    /// No `Authorization: Basic` header, or one that does not decode.
    Missing,
    /// Unknown user or wrong password.
    Refused,
    /// Too many unverified attempts this second: try again later.
    Throttled,
}

/// The configured users and what has been verified.
pub struct BasicAuth {
    users: BTreeMap<String, String>,
    dummy: String,
    remembered: Mutex<HashSet<[u8; 32]>>,
    limiter: DefaultDirectRateLimiter,
    one_at_a_time: Semaphore,
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicAuth")
            .field("users", &self.users())
            .finish_non_exhaustive()
    }
}

const RATE: NonZeroU32 = match NonZeroU32::new(BCRYPT_PER_SECOND) {
    Some(n) => n,
    None => panic!("BCRYPT_PER_SECOND is zero"),
};

impl BasicAuth {
    /// Validates every user name and hash; each problem names its user.
    pub fn new(users: BTreeMap<String, String>) -> Result<BasicAuth, Vec<String>> {
        let mut problems = Vec::new();
        let mut cost = 4;
        for (user, hash) in &users {
            if user.is_empty() || user.contains(':') || user.chars().any(char::is_control) {
                problems.push(format!(
                    "basic_auth_users.{user:?}: a user name must be non-empty, without ':' or \
                     control characters"
                ));
            }
            // Only ASCII reaches the parser (older bcrypt versions panicked on other bytes).
            match hash.is_ascii().then(|| hash.parse::<bcrypt::HashParts>()) {
                Some(Ok(parts)) => cost = cost.max(parts.get_cost()),
                _ => problems.push(format!(
                    "basic_auth_users.{user}: not a bcrypt hash (make one with htpasswd -nBC 10 \
                     {user})"
                )),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let dummy = bcrypt::hash_with_salt("wattd: no such user", cost, [7u8; 16])
            .map_err(|e| vec![format!("basic_auth_users: {e}")])?
            .format_for_version(bcrypt::Version::TwoB);
        Ok(BasicAuth {
            users,
            dummy,
            remembered: Mutex::new(HashSet::new()),
            limiter: RateLimiter::direct(Quota::per_second(RATE)),
            one_at_a_time: Semaphore::new(1),
        })
    }

    /// The configured user names.
    pub fn users(&self) -> Vec<&str> {
        self.users.keys().map(String::as_str).collect()
    }

    /// Checks an `Authorization` header value.
    pub async fn check(&self, authorization: Option<&[u8]>) -> Verdict {
        let Some((user, password)) = authorization.and_then(decode) else {
            return Verdict::Missing;
        };
        let known = self.users.get(&user);
        let hash = known.unwrap_or(&self.dummy).clone();
        let key = remember_key(&user, &password, &hash);
        if known.is_some() && self.remembered().contains(&key) {
            return Verdict::Granted;
        }
        if self.limiter.check().is_err() {
            return Verdict::Throttled;
        }
        let Ok(_permit) = self.one_at_a_time.acquire().await else {
            return Verdict::Refused;
        };
        let ok =
            tokio::task::spawn_blocking(move || bcrypt::verify(&password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false);
        if !(ok && known.is_some()) {
            return Verdict::Refused;
        }
        let mut r = self.remembered();
        if r.len() >= REMEMBERED_MAX {
            r.clear();
        }
        r.insert(key);
        Verdict::Granted
    }

    fn remembered(&self) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
        // A panic while holding the lock cannot leave the set inconsistent (insert and clear
        // are whole operations): keep using it.
        self.remembered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn remember_key(user: &str, password: &[u8], hash: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [user.as_bytes(), password, hash.as_bytes()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// `Basic base64(user:password)`: the user (UTF-8) and the password's bytes.
fn decode(value: &[u8]) -> Option<(String, Vec<u8>)> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    let colon = raw.iter().position(|&b| b == b':')?;
    let user = String::from_utf8(raw[..colon].to_vec()).ok()?;
    Some((user, raw[colon + 1..].to_vec()))
}

/// The `Authorization` header value for `user` and `password` (for clients).
pub fn header_value(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> BasicAuth {
        let mut users = BTreeMap::new();
        users.insert("prom".to_owned(), bcrypt::hash("right", 4).unwrap());
        BasicAuth::new(users).unwrap()
    }

    #[tokio::test]
    async fn the_right_password_is_granted_and_remembered() {
        let a = auth();
        let h = header_value("prom", "right");
        assert_eq!(a.check(Some(h.as_bytes())).await, Verdict::Granted);
        // Remembered: granted even when the attempt budget is spent.
        while a.limiter.check().is_ok() {}
        assert_eq!(a.check(Some(h.as_bytes())).await, Verdict::Granted);
        assert_eq!(
            a.check(Some(header_value("prom", "wrong").as_bytes()))
                .await,
            Verdict::Throttled
        );
    }

    #[tokio::test]
    async fn wrong_unknown_and_malformed_credentials_are_refused() {
        let a = auth();
        let wrong = header_value("prom", "wrong");
        assert_eq!(a.check(Some(wrong.as_bytes())).await, Verdict::Refused);
        // An unknown user whose password happens to match the dummy hash is still refused.
        let unknown = header_value("nobody", "wattd: no such user");
        assert_eq!(a.check(Some(unknown.as_bytes())).await, Verdict::Refused);
        for bad in [
            &b"Bearer abc"[..],
            b"Basic",
            b"Basic !!!",
            b"Basic bm9jb2xvbg==", // "nocolon"
            b"\xff\xfe",
        ] {
            assert_eq!(a.check(Some(bad)).await, Verdict::Missing, "{bad:?}");
        }
        assert_eq!(a.check(None).await, Verdict::Missing);
        // The scheme is case-insensitive.
        let lower = header_value("prom", "right").replacen("Basic", "basic", 1);
        assert_eq!(a.check(Some(lower.as_bytes())).await, Verdict::Granted);
    }

    #[tokio::test]
    async fn unremembered_attempts_are_throttled() {
        let a = auth();
        let wrong = header_value("prom", "wrong");
        let mut verdicts = Vec::new();
        for _ in 0..BCRYPT_PER_SECOND + 2 {
            verdicts.push(a.check(Some(wrong.as_bytes())).await);
        }
        assert!(verdicts.contains(&Verdict::Throttled), "{verdicts:?}");
        assert!(verdicts.contains(&Verdict::Refused), "{verdicts:?}");
        assert!(!verdicts.contains(&Verdict::Granted), "{verdicts:?}");
    }
}
