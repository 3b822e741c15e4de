//! `crew run`, `crew fetch` and the daemon with an S3 store (the local
//! emulator, see `crew_store_s3::testing`): large streams spilled by the
//! agents, staged inputs and job outputs land in the bucket under the URL's
//! prefix; credentials may come from a profile; an unusable store stops
//! everything before any job runs, with one line that says what to fix.

use std::time::Duration;

use crew_core::store::{Store, StoreKey};
use crew_store_s3::S3Store;
use crew_store_s3::testing::{create_bucket, endpoint, store_url, unique_bucket};

use crate::support::{DEADLINE, OnDrop, Reaper, aws_crew, crew, run, unique};

/// Bytes a job prints: more than the 64 KiB kept inline.
const BIG: usize = 200_000;

#[test]
fn run_spills_large_stdout_into_the_bucket_under_the_prefix() {
    let Some(endpoint) = endpoint("run_spills_large_stdout_into_the_bucket_under_the_prefix") else { return };
    let bucket = unique_bucket("crew-cli");
    create_bucket(&endpoint, &bucket).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("s3-run-");
    let _reaper = Reaper::new(&mark);
    let store = format!("s3://{bucket}/run1");
    let jobs = format!("yes x | head -c {BIG}\necho small\n");
    let out = run(
        aws_crew(dir.path(), &mark, &endpoint, &["run", "--json", "--workers", "2", "--store", &store, "-"]),
        Some(&jobs),
        DEADLINE,
    );
    assert_eq!(out.code(), Some(0), "{out}");
    let records = out.records();
    let big = records.iter().find(|r| r["stdout"]["bytes"] == BIG).unwrap_or_else(|| panic!("{out}"));
    assert_eq!(big["stdout"]["truncated"], true, "{big}");
    let key = big["stdout"]["key"].as_str().unwrap_or_else(|| panic!("no store key: {big}"));
    assert!(key.starts_with("jobs/"), "{key}");

    // The agent wrote it into the bucket, under run1/.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let root = S3Store::open(&store_url(&endpoint, &bucket, "")).await.expect("open the bucket");
        let object = StoreKey::new(format!("run1/{key}")).expect("key");
        let meta = root.head(&object).await.unwrap_or_else(|e| panic!("{object}: {e}"));
        assert_eq!(meta.size, BIG as u64);
        // Nothing outside the prefix (the check's probe was removed).
        let all = root.list(&StoreKey::new("run1").expect("key")).await.expect("list");
        assert!(all.iter().all(|m| m.key.as_str().starts_with("run1/jobs/")), "{all:?}");
    });
}

#[test]
fn run_with_a_missing_bucket_fails_before_running_anything() {
    let Some(endpoint) = endpoint("run_with_a_missing_bucket_fails_before_running_anything") else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("s3-missing-");
    let _reaper = Reaper::new(&mark);
    let bucket = unique_bucket("crew-missing");
    let store = format!("s3://{bucket}/x");
    let touched = dir.path().join("touched");
    let jobs = format!("touch {}\n", touched.display());
    let out = run(aws_crew(dir.path(), &mark, &endpoint, &["run", "--store", &store, "-"]), Some(&jobs), DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {out}");
    assert!(lines[0].contains(&format!("bucket {bucket} does not exist")), "{out}");
    assert!(lines[0].contains("create it or fix --store"), "{out}");
    assert!(out.elapsed < Duration::from_secs(10), "took {:?}", out.elapsed);
    assert!(!touched.exists(), "a job ran although the store is unusable");
}

#[test]
fn fetch_from_a_missing_bucket_is_exit_2_as_for_run() {
    let Some(endpoint) = endpoint("fetch_from_a_missing_bucket_is_exit_2_as_for_run") else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("s3-fetch-missing-");
    let _reaper = Reaper::new(&mark);
    let bucket = unique_bucket("crew-missing");
    let store = format!("s3://{bucket}/x");
    for job in ["1", "by-name"] {
        let out = run(aws_crew(dir.path(), &mark, &endpoint, &["fetch", "--store", &store, job]), None, DEADLINE);
        assert_eq!(out.code(), Some(2), "{job}: {out}");
        assert!(out.stderr.contains(&format!("bucket {bucket} does not exist")), "{job}: {out}");
    }
}

#[test]
fn run_without_a_region_says_how_to_set_one() {
    // No emulator needed: the region is resolved before any request.
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("s3-region-");
    let _reaper = Reaper::new(&mark);
    let mut c = crew(dir.path(), &mark, &["run", "--store", "s3://crew-no-region/x", "-"]);
    for var in ["AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_ENDPOINT_URL"] {
        c.env_remove(var);
    }
    c.env("AWS_CONFIG_FILE", dir.path().join("no-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.path().join("no-credentials"))
        .env("AWS_EC2_METADATA_DISABLED", "true");
    let out = run(c, Some("true\n"), DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("no AWS region"), "{out}");
    assert!(out.stderr.contains("?region="), "{out}");
}

#[test]
fn the_daemon_uses_an_s3_store_and_refuses_to_start_on_a_missing_bucket() {
    let Some(endpoint) = endpoint("the_daemon_uses_an_s3_store_and_refuses_to_start_on_a_missing_bucket") else {
        return;
    };
    let mark = unique("s3-daemon-");
    let _reaper = Reaper::new(&mark);

    // A missing bucket: the daemon does not start, and says why.
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let missing = unique_bucket("crew-missing");
    let mut up = aws_crew(d, &mark, &endpoint, &["up"]);
    up.env("CREW_STORE", format!("s3://{missing}/d"));
    let out = run(up, None, DEADLINE);
    assert_ne!(out.code(), Some(0), "{out}");
    assert!(out.stderr.contains(&format!("bucket {missing} does not exist")), "{out}");
    assert!(!d.join(".crew/crew.sock").exists(), "a daemon is serving despite the missing bucket");

    // An existing bucket in crew.toml: `logs` reads a spilled stream back.
    let bucket = unique_bucket("crew-daemon");
    create_bucket(&endpoint, &bucket).unwrap_or_else(|e| panic!("{e}"));
    std::fs::create_dir_all(d.join(".crew")).expect("mkdir");
    std::fs::write(d.join(".crew/crew.toml"), format!("[daemon]\nstore = \"s3://{bucket}/daemon\"\n"))
        .expect("crew.toml");
    let crew_ok = |args: &[&str]| {
        let out = run(aws_crew(d, &mark, &endpoint, args), None, DEADLINE);
        assert_eq!(out.code(), Some(0), "crew {}\n{out}", args.join(" "));
        out
    };
    let stop = || {
        let _ = run(aws_crew(d, &mark, &endpoint, &["down"]), None, DEADLINE);
    };
    let _down = OnDrop(&stop);
    crew_ok(&["recruit", "--workers", "1", "--class", "local"]);
    let shell = format!("yes y | head -c {BIG}");
    let id = crew_ok(&["send", "--", "sh", "-c", &shell]).stdout.trim().to_owned();
    crew_ok(&["wait", "--timeout", "60s"]);
    let logs = crew_ok(&["logs", &id]);
    assert_eq!(logs.stdout.len(), BIG, "the whole stream, from the bucket");
    assert!(logs.stdout.bytes().all(|b| b == b'y' || b == b'\n'));
}

#[test]
fn credentials_and_region_come_from_a_profile_for_the_controller_and_its_workers() {
    let Some(endpoint) = endpoint("credentials_and_region_come_from_a_profile") else { return };
    let bucket = unique_bucket("crew-profile");
    create_bucket(&endpoint, &bucket).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("s3-profile-");
    let _reaper = Reaper::new(&mark);
    std::fs::write(d.join("config"), format!("[profile crewtest]\nregion = us-east-1\nendpoint_url = {endpoint}\n"))
        .expect("config");
    std::fs::write(
        d.join("credentials"),
        "[crewtest]\naws_access_key_id = AKIDPROFILE\naws_secret_access_key = s3cr3t\naws_session_token = tok\n",
    )
    .expect("credentials");
    let mut c = crew(d, &mark, &["run", "--json", "--store", &format!("s3://{bucket}/p?profile=crewtest"), "-"]);
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "CREW_STORE",
    ] {
        c.env_remove(var);
    }
    c.env("AWS_CONFIG_FILE", d.join("config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", d.join("credentials"))
        .env("AWS_EC2_METADATA_DISABLED", "true");
    let out = run(c, Some(&format!("yes p | head -c {BIG}\n")), DEADLINE);
    assert_eq!(out.code(), Some(0), "{out}");
    let record = &out.records()[0];
    assert_eq!(record["stdout"]["truncated"], true, "{record}");
    // No secret in anything crew printed.
    assert!(!out.stdout.contains("s3cr3t") && !out.stderr.contains("s3cr3t"), "{out}");
    let key = record["stdout"]["key"].as_str().unwrap_or_default().to_owned();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let root = S3Store::open(&store_url(&endpoint, &bucket, "")).await.expect("open the bucket");
        let object = StoreKey::new(format!("p/{key}")).expect("key");
        assert_eq!(root.head(&object).await.unwrap_or_else(|e| panic!("{object}: {e}")).size, BIG as u64);
    });
}

#[test]
fn inputs_and_outputs_go_through_an_s3_store_and_fetch_brings_them_back() {
    let Some(endpoint) = endpoint("inputs_and_outputs_go_through_an_s3_store") else { return };
    let bucket = unique_bucket("crew-staging");
    create_bucket(&endpoint, &bucket).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("s3-staging-");
    let _reaper = Reaper::new(&mark);
    // 3 MiB of input; the job's output is a copy of it, fetched back
    // byte-exact through the bucket.
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 17).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(d.join("data.bin"), &data).expect("input");
    let store = format!("s3://{bucket}/st");
    let out = run(
        aws_crew(
            d,
            &mark,
            &endpoint,
            &["run", "--json", "--store", &store, "--input", "data.bin", "--output", "copy.bin", "-"],
        ),
        Some("cp data.bin copy.bin\n"),
        DEADLINE,
    );
    assert_eq!(out.code(), Some(0), "{out}");
    let id = out.records()[0]["id"].as_u64().unwrap_or_else(|| panic!("{out}")).to_string();
    let fetched = d.join("fetched");
    let out = run(
        aws_crew(d, &mark, &endpoint, &["fetch", "--store", &store, &id, "--to", fetched.to_str().expect("utf-8")]),
        None,
        DEADLINE,
    );
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(std::fs::read(fetched.join("copy.bin")).expect("fetched output") == data, "the output differs");
    // The input was stored once, content-addressed, under the prefix.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let root = S3Store::open(&store_url(&endpoint, &bucket, "")).await.expect("open the bucket");
        let cas = root.list(&StoreKey::new("st/cas/sha256").expect("key")).await.expect("list");
        assert_eq!(cas.len(), 1, "{cas:?}");
        assert_eq!(cas[0].size, data.len() as u64);
    });
}

/// Dedup checks content, not size: an object already at the input's
/// content address with the input's size but other bytes is not taken for
/// the input; the job reads the real input, and the object is replaced.
#[test]
fn an_s3_object_of_the_same_size_but_other_content_is_not_taken_for_an_input() {
    use sha2::{Digest, Sha256};
    let test = "an_s3_object_of_the_same_size_but_other_content_is_not_taken_for_an_input";
    let Some(endpoint) = endpoint(test) else { return };
    let bucket = unique_bucket("crew-dedup");
    create_bucket(&endpoint, &bucket).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("s3-dedup-");
    let _reaper = Reaper::new(&mark);
    let data = b"the real input, 33 bytes of it!!\n".to_vec();
    std::fs::write(d.join("data.bin"), &data).expect("input");
    let digest: String = Sha256::digest(&data).iter().map(|b| format!("{b:02x}")).collect();
    let key = StoreKey::new(format!("st/cas/sha256/{digest}")).expect("key");
    let forged = vec![b'x'; data.len()];
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let root = rt.block_on(S3Store::open(&store_url(&endpoint, &bucket, ""))).expect("open the bucket");
    rt.block_on(root.put_bytes(&key, forged.into())).expect("put the forged object");
    let store = format!("s3://{bucket}/st");
    let out = run(
        aws_crew(d, &mark, &endpoint, &["run", "--json", "--store", &store, "--input", "data.bin", "-"]),
        Some("cat data.bin\n"),
        DEADLINE,
    );
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(out.records()[0]["stdout"]["text"].as_str(), Some(std::str::from_utf8(&data).expect("utf-8")), "{out}");
    let stored = rt.block_on(crew_core::staging::read_small(&root, &key, 1024)).expect("read the object back");
    assert_eq!(stored, data, "the forged object was not replaced");
}
