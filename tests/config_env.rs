//! Environment overrides. In a test binary of its own: figment's `Jail` changes the process's
//! environment and working directory, which would disturb tests running beside it.

use std::path::Path;

use pharox::config::Config;

#[test]
#[allow(clippy::result_large_err)] // figment's Jail API returns its own error type
fn environment_overrides_the_file() {
    figment::Jail::expect_with(|jail| {
        jail.create_file("p.toml", "[[consumers]]\nname = \"w\"\npassword = \"x\"\n[[pools]]\nname = \"p\"\n[[pools.proxies]]\nurl = \"direct\"\n")?;
        jail.set_env("PHAROX_CONFIG", "ignored.toml");
        jail.set_env("PHAROX_LISTEN", "127.0.0.1:18899");
        jail.set_env("PHAROX_ADMIN__LISTEN", "127.0.0.1:19899");
        jail.set_env("PHAROX_LIMITS__MAX_CONNECTIONS", "7");
        let c = Config::load(Path::new("p.toml")).map_err(|e| e.to_string())?;
        assert_eq!(c.listen.to_string(), "127.0.0.1:18899");
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:19899");
        assert_eq!(c.limits.max_connections, 7);
        jail.set_env("PHAROX_LIMITS__MAX_CONECTIONS", "7");
        let err = Config::load(Path::new("p.toml")).unwrap_err().to_string();
        assert!(err.contains("max_conections"), "{err}");
        Ok(())
    });
}
