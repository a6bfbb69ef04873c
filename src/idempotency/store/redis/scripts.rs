//! The Lua scripts that make each `RedisStore` operation atomic.
//!
//! Every script touches one key, `KEYS[1]`, a hash with these fields:
//!
//! | field | in flight | completed |
//! |---|---|---|
//! | `fingerprint` | 32 digest bytes | 32 digest bytes |
//! | `owner` | the owner token | absent |
//! | `head` | absent | status and headers, see `codec` |
//! | `body` | absent | body bytes, absent when the body was not kept |
//!
//! The key's own expiry (`PEXPIRE`) is the lease while the record is in flight and the
//! replay TTL once it is completed, so Redis deletes expired records by itself.

use redis::Script;

/// Claims an absent key, or returns the state of a live record.
///
/// `SET key value NX PX ttl` alone cannot return the stored response when the key
/// exists, and a second command to read it could see the record released or expired in
/// between. This script claims or reads in one atomic step.
///
/// `KEYS[1]`: the record. `ARGV`: fingerprint, owner token, lock TTL in milliseconds.
/// Returns `{"claimed"}`, `{"mismatch"}`, `{"in_flight", pttl}` or
/// `{"completed", head, body}`, where a missing body is `false` (a nil reply).
const BEGIN: &str = r"
local fingerprint = redis.call('HGET', KEYS[1], 'fingerprint')
if not fingerprint then
  redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'owner', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'claimed'}
end
if fingerprint ~= ARGV[1] then
  return {'mismatch'}
end
if redis.call('HEXISTS', KEYS[1], 'owner') == 1 then
  return {'in_flight', redis.call('PTTL', KEYS[1])}
end
local stored = redis.call('HMGET', KEYS[1], 'head', 'body')
return {'completed', stored[1], stored[2]}
";

/// Stores the response if the record is in flight for the owner.
///
/// `KEYS[1]`: the record. `ARGV`: owner token, replay TTL in milliseconds, head, and the
/// body when there is one. Returns 1 when stored, 0 when the owner is stale.
///
/// `HDEL` comes first on purpose. Redis checks `maxmemory` only before a script's first
/// write (Redis 7 scripts without flags), and `HDEL` needs no memory. So a full server
/// still stores the response of a request that ran, past `maxmemory` by at most one
/// response per claim, while `BEGIN` rejects new claims.
const COMPLETE: &str = r"
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return 0
end
redis.call('HDEL', KEYS[1], 'owner')
redis.call('HSET', KEYS[1], 'head', ARGV[3])
if #ARGV >= 4 then
  redis.call('HSET', KEYS[1], 'body', ARGV[4])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

/// Deletes the record if it is in flight for the owner.
///
/// `KEYS[1]`: the record. `ARGV`: owner token. Returns 1 when deleted, 0 when the owner is
/// stale.
const RELEASE: &str = r"
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
return 1
";

/// Sets a new lease on the record if it is in flight for the owner.
///
/// `KEYS[1]`: the record. `ARGV`: owner token, lock TTL in milliseconds. Returns 1 when
/// renewed, 0 when the owner is stale.
const RENEW: &str = r"
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

/// The four scripts with their SHA1 digests computed once.
///
/// `Script::invoke_async` sends `EVALSHA` and falls back to `EVAL` when the server
/// replies `NOSCRIPT`, for instance after a restart emptied its script cache.
pub(super) struct Scripts {
    pub(super) begin: Script,
    pub(super) complete: Script,
    pub(super) release: Script,
    pub(super) renew: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Scripts {
            begin: Script::new(BEGIN),
            complete: Script::new(COMPLETE),
            release: Script::new(RELEASE),
            renew: Script::new(RENEW),
        }
    }
}
