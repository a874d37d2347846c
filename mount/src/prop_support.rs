//! How many cases each property test runs: few by default, so the whole
//! suite stays fast in CI; as many as asked with `PROPTEST_CASES`
//! (`PROPTEST_CASES=100000 cargo test -p secretfs-mount prop_`).

use proptest::test_runner::Config;

/// Cases per property when `PROPTEST_CASES` is not set.
pub const DEFAULT_CASES: u32 = 64;

/// proptest's configuration (which reads every `PROPTEST_*` variable),
/// with [`DEFAULT_CASES`] unless `PROPTEST_CASES` says otherwise.
pub fn config() -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = DEFAULT_CASES;
    }
    config
}
