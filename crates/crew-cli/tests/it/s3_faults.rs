//! `crew run` with an S3 store behind a fault-injecting proxy
//! (`crew_store_s3::testing::FaultProxy`: 503 SlowDown, connections dropped
//! before answering, mid-request and mid-response): the controller stages
//! inputs and the agents fetch them and upload outputs through the faults;
//! every job still succeeds, and every output comes back byte-identical,
//! fetched directly from the emulator and through the proxy.

use std::time::Duration;

use crew_store_s3::PART_SIZE;
use crew_store_s3::testing::{Fault, FaultProxy, create_bucket, endpoint, mix, store_url, unique_bucket};
use sha2::{Digest, Sha256};

use crate::support::{Reaper, aws_crew, run, unique};

const JOBS: usize = 20;
/// Jobs whose output includes a copy of the shared input (a multipart upload).
const BIG_COPY_EVERY: usize = 7;

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn random(seed: u64, n: usize) -> Vec<u8> {
    (0..n.div_ceil(8))
        .flat_map(|i| mix(seed ^ (i as u64).wrapping_mul(0x1234_5678_9abc_def1)).to_le_bytes())
        .take(n)
        .collect()
}

#[test]
fn jobs_through_a_faulty_s3_endpoint_all_succeed_and_outputs_fetch_back_identical() {
    let test = "jobs_through_a_faulty_s3_endpoint_all_succeed_and_outputs_fetch_back_identical";
    let Some(endpoint) = endpoint(test) else { return };
    let bucket = unique_bucket("crew-cli-faults");
    create_bucket(&endpoint, &bucket).unwrap_or_else(|e| panic!("{e}"));
    let seed = mix(u64::from(std::process::id()) ^ 0xfa_u64);
    let proxy = FaultProxy::start(&endpoint, 220, &Fault::ALL, seed).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("fault proxy {} seed {seed:#x} (22% of requests faulted)", proxy.url());

    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("s3-faults-");
    let _reaper = Reaper::new(&mark);

    // One shared input of more than one part (a multipart upload), and one
    // small input per job.
    let shared = random(seed, PART_SIZE + 1_234_567);
    std::fs::write(d.join("shared.bin"), &shared).expect("write shared");
    let mut lines = Vec::new();
    let mut inputs = Vec::new();
    for i in 0..JOBS {
        let own = random(seed ^ mix(i as u64 + 1), 100_000 + i * 3_001);
        std::fs::write(d.join(format!("in-{i}.bin")), &own).expect("write input");
        let big = i % BIG_COPY_EVERY == 0;
        let copy_shared = if big { " && cp shared.bin out/shared.bin" } else { "" };
        let shell =
            format!("mkdir -p out && cp in.bin out/own.bin && sha256sum shared.bin in.bin > out/sums.txt{copy_shared}");
        lines.push(
            serde_json::json!({
                "name": format!("job-{i}"),
                "shell": shell,
                "inputs": ["shared.bin", format!("in-{i}.bin=in.bin")],
                "outputs": ["out/*"],
            })
            .to_string(),
        );
        inputs.push(own);
    }
    std::fs::write(d.join("jobs.txt"), lines.join("\n") + "\n").expect("write jobs");

    let through_proxy = store_url(proxy.url(), &bucket, "run");
    let direct = store_url(&endpoint, &bucket, "run");
    let out = run(
        aws_crew(d, &mark, proxy.url(), &["run", "--json", "--workers", "2", "--store", &through_proxy, "jobs.txt"]),
        None,
        Duration::from_secs(120),
    );
    let during = proxy.counts();
    eprintln!("fault proxy after the run: {during:?} ({:?})", out.elapsed);
    assert_eq!(out.code(), Some(0), "{out}");
    let records = out.records();
    assert_eq!(records.len(), JOBS, "{out}");

    // The run went through many faults (which kinds depends on the order of
    // the requests; every kind is required over the whole test, below), and
    // no upload was bad.
    assert!(during.faults() >= 10, "too few faults during the run to prove anything: {during:?}");
    assert_eq!(during.bad_checksums, 0, "uploads without a correct x-amz-checksum-sha256: {during:?}");

    // Every output, fetched directly and through the faults, is what the
    // job wrote.
    for (i, own) in inputs.iter().enumerate() {
        let name = format!("job-{i}");
        let record = records.iter().find(|r| r["name"] == name.as_str()).unwrap_or_else(|| panic!("no {name}: {out}"));
        assert_eq!(record["exit_code"], 0, "{record}");
        let id = record["id"].as_u64().unwrap_or_else(|| panic!("no id: {record}")).to_string();
        let mut want = vec![
            ("own.bin", own.clone()),
            ("sums.txt", format!("{}  shared.bin\n{}  in.bin\n", sha256_hex(&shared), sha256_hex(own)).into_bytes()),
        ];
        if i % BIG_COPY_EVERY == 0 {
            want.push(("shared.bin", shared.clone()));
        }
        let objects = record["objects"].as_array().unwrap_or_else(|| panic!("no objects: {record}"));
        assert_eq!(objects.len(), want.len(), "{record}");
        for (file, bytes) in &want {
            let object = objects
                .iter()
                .find(|o| o["name"] == format!("out/{file}").as_str())
                .unwrap_or_else(|| panic!("no out/{file}: {record}"));
            assert_eq!(object["sha256"], sha256_hex(bytes).as_str(), "{name} out/{file}: {record}");
        }
        for (how, store, via) in [("direct", &direct, endpoint.as_str()), ("proxy", &through_proxy, proxy.url())] {
            let to = d.join(format!("fetched-{how}/{i}"));
            let to_arg = to.to_string_lossy().into_owned();
            let out = run(
                aws_crew(d, &mark, via, &["fetch", "--store", store, &id, "--to", &to_arg]),
                None,
                Duration::from_secs(60),
            );
            assert_eq!(out.code(), Some(0), "fetch {name} ({how}): {out}");
            for (file, bytes) in &want {
                let got = std::fs::read(to.join("out").join(file))
                    .unwrap_or_else(|e| panic!("{name} out/{file} ({how}): {e}"));
                assert_eq!(got.len(), bytes.len(), "{name} out/{file} ({how})");
                assert_eq!(sha256_hex(&got), sha256_hex(bytes), "{name} out/{file} ({how})");
            }
        }
    }
    let after = proxy.counts();
    eprintln!("fault proxy after the fetches: {after:?}");
    assert!(after.faults() > during.faults(), "no fault during the fetches: {after:?}");
    for kind in Fault::ALL {
        assert!(after.of(kind) > 0, "no {kind:?} in the whole test: {after:?}");
    }
}
