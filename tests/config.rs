//! Configuration: the shipped files load, every invalid fixture fails with its message,
//! environment overrides apply, `proxies_file` lines parse.

use std::path::Path;

use pharox::config::{Config, ConfigError, parse_proxy_line, parse_upstream_url};
use pharox::{ProxyProtocol, Selector};

/// A path in the repository (absolute, whatever the working directory).
fn repo(p: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

#[test]
fn the_shipped_config_loads() {
    let c = Config::load(&repo("config/pharox.toml")).unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:8899");
    assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9899");
    assert!(c.auth.required);
    assert_eq!(c.pools.len(), 1);
    assert_eq!(
        parse_upstream_url(&c.pools[0].proxies[0].url)
            .unwrap()
            .protocol,
        ProxyProtocol::Direct
    );
}

#[test]
fn the_example_loads_with_its_proxies_file_and_password_variables() {
    let toml = std::fs::read_to_string(repo("config/examples/multi-pool.toml")).unwrap();
    let env = |name: &str| Some(format!("pw-of-{name}"));
    let c = Config::from_toml_str(&toml, &repo("config/examples"), &env).unwrap();
    assert_eq!(
        c.consumers[0].password.as_ref().unwrap().expose(),
        "pw-of-SCRAPER_LATAM_PASSWORD"
    );
    let dc = c.pools.iter().find(|p| p.name == "datacenter").unwrap();
    assert_eq!(dc.selector, Selector::RoundRobin);
    assert_eq!(dc.proxies.len(), 4);
    assert_eq!(dc.proxies[2].meta.asn, Some(24940));
    assert_eq!(dc.proxies[3].id.as_deref(), Some("dc-eu-socks"));
    let missing = Config::from_toml_str(&toml, &repo("config/examples"), &|_| None).unwrap_err();
    assert!(
        missing.to_string().contains(
            "consumers[0].password_env: environment variable `SCRAPER_LATAM_PASSWORD` is not set"
        ),
        "{missing}"
    );
}

#[test]
fn every_invalid_fixture_fails_with_its_message() {
    let mut files: Vec<_> = std::fs::read_dir(repo("config/invalid"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "fixtures found: {files:?}");
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no `# expect:` line", path.display()));
        let err = Config::load(&path)
            .expect_err(&path.display().to_string())
            .to_string();
        assert!(err.contains(expect), "{}: {err}", path.display());
        let name = path.file_name().unwrap().to_string_lossy();
        assert!(
            err.contains(&format!("invalid/{name}")),
            "the message names the file: {err}"
        );
    }
}

#[test]
fn a_named_missing_file_is_an_error() {
    let err = Config::load(&repo("config/nope.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::File { .. }), "{err}");
}

#[test]
fn proxies_file_lines() {
    assert!(parse_proxy_line("   # comment").unwrap().is_none());
    assert!(parse_proxy_line("").unwrap().is_none());
    let p = parse_proxy_line("socks5h://u:p@h:1080 country=ar max_concurrency=3 asn=7 # note")
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            p.url.as_str(),
            p.meta.country.as_deref(),
            p.max_concurrency,
            p.meta.asn
        ),
        ("socks5h://u:p@h:1080", Some("ar"), Some(3), Some(7))
    );
    assert!(
        parse_proxy_line("http://h:1 colour=red")
            .unwrap_err()
            .contains("unknown key `colour`")
    );
    assert!(
        parse_proxy_line("http://h:1 max_concurrency=lots")
            .unwrap_err()
            .contains("max_concurrency")
    );
    assert!(
        parse_proxy_line("http://h:1 country")
            .unwrap_err()
            .contains("key=value")
    );
}

#[test]
fn upstream_urls() {
    let u = parse_upstream_url("http://user:p%40ss@[::1]:8080").unwrap();
    assert_eq!(
        (u.host.as_str(), u.port, u.username.as_deref()),
        ("::1", 8080, Some("user"))
    );
    assert_eq!(u.password.unwrap().expose(), "p@ss");
    assert!(parse_upstream_url("http://host").is_err());
    assert!(parse_upstream_url("http://host:0").is_err());
    let err = parse_upstream_url("http://user:topsecret@host").unwrap_err();
    assert!(
        !err.contains("topsecret"),
        "errors never echo passwords: {err}"
    );
}

#[test]
fn released_lease_history_is_kept_as_configured() {
    let with = |extra: &str| {
        let toml = format!(
            "[storage]\nkind = \"postgres\"\nurl = \"postgres://u@127.0.0.1/db\"\n{extra}\n\
             [[pools]]\nname = \"p\"\n[[pools.proxies]]\nurl = \"http://10.0.0.1:8080\"\n"
        );
        let c = Config::from_toml_str(&toml, &repo("config"), &|_| None).unwrap();
        pharox::app::pg_settings(&c.storage).unwrap().keep_released
    };
    let day = std::time::Duration::from_secs(24 * 3600);
    assert_eq!(with(""), Some(day), "default: a day");
    assert_eq!(with("keep_released_hours = 48"), Some(day * 2));
    assert_eq!(with("keep_released_hours = 0"), None, "0: kept for good");
}
