//! Per-job random seeds, derived from the crew seed and the job's name.
//!
//! Reproducibility must not depend on which worker runs a job or in what
//! order jobs run (DESIGN.md, principle 5), so the seed is a pure function of
//! two declared values. The function is fixed here and documented in the
//! output format: changing it changes every user's results, so it is part of
//! the API. It is FNV-1a over the bytes, finished with the splitmix64 mixer;
//! this is not cryptographic, only well spread.

/// The seed of a job: a function of the crew seed and the job's key (its
/// name, or its id in decimal when it has no name).
pub fn job_seed(crew_seed: u64, job_key: &str) -> u64 {
    seed_of_bytes(crew_seed, job_key.as_bytes())
}

/// [`job_seed`] of a job named `name`, or of the unnamed job `id`, without
/// writing the key out as a string first (it is computed for every job
/// accepted).
pub fn job_seed_of(crew_seed: u64, name: Option<&str>, id: u64) -> u64 {
    if let Some(name) = name {
        return seed_of_bytes(crew_seed, name.as_bytes());
    }
    // u64::MAX has 20 decimal digits.
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = id;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    seed_of_bytes(crew_seed, &digits[at..])
}

fn seed_of_bytes(crew_seed: u64, job_key: &[u8]) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    for b in crew_seed.to_le_bytes().iter().chain(job_key) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    splitmix64(h)
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::{job_seed, job_seed_of};

    #[test]
    fn a_seed_of_a_name_or_an_id_is_that_of_its_key() {
        for id in [0, 7, 10, 99, 12_345, u64::MAX] {
            assert_eq!(job_seed_of(42, None, id), job_seed(42, &id.to_string()), "{id}");
        }
        assert_eq!(job_seed_of(42, Some("fit-a"), 3), job_seed(42, "fit-a"));
    }

    #[test]
    fn stable_and_distinct() {
        // Pinned: a change here changes every user's random numbers.
        assert_eq!(job_seed(0, "a"), job_seed(0, "a"));
        assert_ne!(job_seed(0, "a"), job_seed(1, "a"));
        assert_ne!(job_seed(0, "a"), job_seed(0, "b"));
        assert_eq!(job_seed(42, "fit"), 0x6395_c76f_ba4e_69b5);
    }
}
