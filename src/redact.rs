//! Keeping passwords out of output: every URL shown in a `Debug`, an error, a log line,
//! a report or the CLI goes through here first.

/// The URL with its password (and any `password=` query value) replaced by `***`, for
/// `Debug`, errors, logs and reports: `redis://:***@host:6379/0`,
/// `postgres://app:***@db/x`. A URL without credentials comes back unchanged. Works on
/// every form [`open`](crate::open) takes, the multi-host cluster form included.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return redact_query(url);
    };
    // A raw `?`, `#` or `/` may be part of the password, so the userinfo is taken up to
    // the last `@` of the whole text, not of the part before the first `?` or `#`.
    // Where an `@` in a query makes that ambiguous, more is hidden, never less.
    match rest.rfind('@') {
        Some(at) => {
            let (userinfo, hosts) = rest.split_at(at);
            match userinfo.split_once(':') {
                Some((user, password)) if !password.is_empty() => {
                    format!("{scheme}://{user}:***{}", redact_query(hosts))
                }
                _ => format!("{scheme}://{}", redact_query(rest)),
            }
        }
        None => format!("{scheme}://{}", redact_query(rest)),
    }
}

/// Masks the values of `password`, `pass`, `pwd` and `secret` query parameters.
fn redact_query(text: &str) -> String {
    let Some(q) = text.find('?') else {
        return text.to_owned();
    };
    let (before, query) = text.split_at(q + 1);
    let masked: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, value))
                if !value.is_empty()
                    && ["password", "pass", "pwd", "secret"]
                        .contains(&key.to_ascii_lowercase().as_str()) =>
            {
                format!("{key}=***")
            }
            _ => pair.to_owned(),
        })
        .collect();
    format!("{before}{}", masked.join("&"))
}

/// The secrets a URL carries: its password as written and percent-decoded, and the
/// values of password query parameters.
pub(crate) fn url_secrets(url: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    if let Some((_, rest)) = url.split_once("://") {
        // The password may run to any `@` (raw `@`, `?`, `#` and `/` included), so
        // every reading is a secret: the longest is replaced first.
        if let Some((user, _)) = rest.split_once(':') {
            let start = user.len() + 1;
            for (at, _) in rest.match_indices('@').filter(|(at, _)| *at > start) {
                secrets.push(rest[start..at].to_owned());
            }
        }
    }
    if let Some((_, query)) = url.split_once('?') {
        for pair in query.split('&') {
            if let Some((key, value)) = pair.split_once('=') {
                if !value.is_empty()
                    && ["password", "pass", "pwd", "secret"]
                        .contains(&key.to_ascii_lowercase().as_str())
                {
                    secrets.push(value.to_owned());
                }
            }
        }
    }
    let decoded: Vec<String> = secrets
        .iter()
        .filter_map(|s| percent_decode(s))
        .filter(|d| !secrets.contains(d))
        .collect();
    secrets.extend(decoded);
    // Longest first, so a secret containing another is replaced whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets.retain(|s| !s.is_empty());
    secrets
}

/// `text` with every secret of `url` replaced by `***`: a last line of defence for
/// messages that quote a driver's error.
pub(crate) fn scrub(text: &str, url: &str) -> String {
    let mut out = text.to_owned();
    for secret in url_secrets(url) {
        out = out.replace(&secret, "***");
    }
    out
}

fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return None;
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_of_every_form() {
        for (url, shown) in [
            ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
            ("rediss://user:pw@h", "rediss://user:***@h"),
            (
                "redis+cluster://u:pw@a:1,b:2/0",
                "redis+cluster://u:***@a:1,b:2/0",
            ),
            (
                "postgres://app:p%40ss@db:5432/x?sslmode=require",
                "postgres://app:***@db:5432/x?sslmode=require",
            ),
            (
                "postgres://app@db/x?password=pw&sslmode=disable",
                "postgres://app@db/x?password=***&sslmode=disable",
            ),
            ("redis://h:6379", "redis://h:6379"),
            ("redis://user@h", "redis://user@h"),
            ("sqlite::memory:", "sqlite::memory:"),
            ("memory://", "memory://"),
            // A raw '/' in the password still does not show it.
            ("redis://:pa/ss@h", "redis://:***@h"),
            // Nor a raw '#' or '?', which a URL parser takes for a fragment or query.
            ("redis://:hunter#2@h:6379/0", "redis://:***@h:6379/0"),
            ("redis://:hunter?2@h:6379/0", "redis://:***@h:6379/0"),
            ("rediss://:pa#ss@h", "rediss://:***@h"),
            ("postgres://app:s3cr#t@db/x", "postgres://app:***@db/x"),
            (
                "postgres://app:s3?cr#t@db/x?password=pw",
                "postgres://app:***@db/x?password=***",
            ),
            (
                "redis+cluster://:a#b?c@x:1,y:2/0",
                "redis+cluster://:***@x:1,y:2/0",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn scrub_removes_raw_and_decoded_passwords() {
        let url = "postgres://app:p%40ss-word@db/x";
        assert_eq!(
            scrub("auth failed for p@ss-word and p%40ss-word", url),
            "auth failed for *** and ***"
        );
        assert_eq!(scrub("nothing here", "memory://"), "nothing here");
        assert_eq!(
            scrub(
                "cannot parse redis://:hunter#2@h/0",
                "redis://:hunter#2@h/0"
            ),
            "cannot parse redis://:***@h/0"
        );
    }
}
