//! HTTP basic authentication against bcrypt hashes, as the Prometheus exporter toolkit does it,
//! with its costs bounded for a daemon that shares the host with the platform:
//! - a verified (user, password) is remembered (as a SHA-256 of user, password and hash, never
//!   the password), so a scraper pays bcrypt once, not every 15 seconds;
//! - every other attempt runs bcrypt on the blocking pool, one at a time (an attempt that finds
//!   one running is answered 429 at once, never queued holding a connection slot), and within a
//!   budget of bcrypt time: [`BCRYPT_PER_SECOND`] verifications a second at cost 10, half as
//!   many per step of cost above it, so a flood of wrong passwords costs at most about a
//!   quarter of one core whatever the cost, while scrapers already verified are still answered;
//! - attempts naming a configured user and attempts naming anyone else have separate budgets, so
//!   guessing user names does not lock out a real scraper's first login (guessing the password
//!   of a configured user does, for as long as the guessing goes on: the budget is what bounds
//!   the guesser);
//! - an unknown user is checked against a dummy hash of the highest configured cost, so the
//!   answer's timing does not say which users exist (when every user has the same cost).

use std::collections::{BTreeMap, HashSet};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;

/// bcrypt verifications of unremembered credentials per second at cost 10, at most (per budget:
/// configured users, others).
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
    /// The budgets of attempts naming a configured user, and of the others.
    known_budget: DefaultDirectRateLimiter,
    unknown_budget: DefaultDirectRateLimiter,
    one_at_a_time: Arc<Semaphore>,
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicAuth")
            .field("users", &self.users())
            .finish_non_exhaustive()
    }
}

/// The bcrypt budget for hashes of `cost`: one verification per period, in bursts of up to
/// [`BCRYPT_PER_SECOND`].
fn budget(cost: u32) -> DefaultDirectRateLimiter {
    let base = Duration::from_secs(1) / BCRYPT_PER_SECOND;
    let period = if cost >= 10 {
        base.saturating_mul(1u32 << (cost - 10).min(20))
    } else {
        (base / (1u32 << (10 - cost).min(20))).max(Duration::from_millis(1))
    };
    let burst = NonZeroU32::new(BCRYPT_PER_SECOND).unwrap_or(NonZeroU32::MIN);
    let quota = Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst);
    RateLimiter::direct(quota)
}

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
                Some(Ok(parts)) if !(4..=31).contains(&parts.get_cost()) => problems.push(format!(
                    "basic_auth_users.{user}: bcrypt cost {} is outside 4 ..= 31",
                    parts.get_cost()
                )),
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
            known_budget: budget(cost),
            unknown_budget: budget(cost),
            one_at_a_time: Arc::new(Semaphore::new(1)),
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
        // One at a time, never queued: a request waiting here would hold a connection slot.
        let Ok(permit) = Arc::clone(&self.one_at_a_time).try_acquire_owned() else {
            return Verdict::Throttled;
        };
        let budget = if known.is_some() {
            &self.known_budget
        } else {
            &self.unknown_budget
        };
        if budget.check().is_err() {
            return Verdict::Throttled;
        }
        // The permit goes with the work: if the request is dropped (its connection timed out),
        // the verification still counts as running until it ends.
        let ok = tokio::task::spawn_blocking(move || {
            let ok = bcrypt::verify(&password, &hash).unwrap_or(false);
            drop(permit);
            ok
        })
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
        while a.known_budget.check().is_ok() {}
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
    async fn guessing_user_names_does_not_spend_the_configured_users_budget() {
        let a = auth();
        while a.unknown_budget.check().is_ok() {}
        let guess = header_value("admin", "x");
        assert_eq!(a.check(Some(guess.as_bytes())).await, Verdict::Throttled);
        let real = header_value("prom", "right");
        assert_eq!(a.check(Some(real.as_bytes())).await, Verdict::Granted);
    }

    #[tokio::test]
    async fn an_attempt_while_one_verification_runs_is_refused_at_once() {
        let a = auth();
        let held = Arc::clone(&a.one_at_a_time).try_acquire_owned().unwrap();
        let h = header_value("prom", "right");
        assert_eq!(a.check(Some(h.as_bytes())).await, Verdict::Throttled);
        drop(held);
        assert_eq!(a.check(Some(h.as_bytes())).await, Verdict::Granted);
    }

    #[test]
    fn the_budget_shrinks_as_the_cost_grows() {
        use governor::clock::{Clock as _, DefaultClock};
        let n = |cost: u32| {
            let b = budget(cost);
            let mut n = 0;
            while b.check().is_ok() {
                n += 1;
            }
            // The wait for the next one: the period.
            match b.check() {
                Err(not_until) => (n, not_until.wait_time_from(DefaultClock::default().now())),
                Ok(()) => (n, Duration::ZERO),
            }
        };
        let (burst, p10) = n(10);
        assert_eq!(burst, BCRYPT_PER_SECOND);
        let (_, p12) = n(12);
        let (_, p4) = n(4);
        assert!(
            p10 > Duration::from_millis(200) && p10 <= Duration::from_millis(250),
            "{p10:?}"
        );
        assert!(p12 > Duration::from_millis(900), "{p12:?}");
        assert!(p4 < Duration::from_millis(10), "{p4:?}");
    }

    #[test]
    fn a_cost_outside_bcrypts_range_is_refused() {
        let mut users = BTreeMap::new();
        users.insert(
            "p".to_owned(),
            "$2b$03$abcdefghijklmnopqrstuuABCDEFGHIJKLMNOPQRSTUVWXYZ01234".to_owned(),
        );
        let e = BasicAuth::new(users).unwrap_err().join("; ");
        assert!(e.contains("basic_auth_users.p"), "{e}");
    }

    #[tokio::test]
    async fn unremembered_attempts_are_throttled() {
        // Cost 10: the budget refills one verification per 250 ms, far longer than this test
        // takes between draining it and the next attempt.
        let mut users = BTreeMap::new();
        users.insert("prom".to_owned(), bcrypt::hash("right", 10).unwrap());
        let a = BasicAuth::new(users).unwrap();
        let wrong = header_value("prom", "wrong");
        assert_eq!(a.check(Some(wrong.as_bytes())).await, Verdict::Refused);
        while a.known_budget.check().is_ok() {}
        assert_eq!(a.check(Some(wrong.as_bytes())).await, Verdict::Throttled);
        // Even the right password waits for the budget (it is not remembered yet).
        let right = header_value("prom", "right");
        assert_eq!(a.check(Some(right.as_bytes())).await, Verdict::Throttled);
    }
}
