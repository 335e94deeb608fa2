//! reshape_and_cache on the CPU: the reference of `cuda/cache.cu`.
//!
//! Scatters `[tokens, num_kv_heads * head_dim]` K/V rows into the paged caches (layout
//! `[num_blocks, block_size, num_kv_heads, head_dim]`, so slot `s` is the row at `s * row_len`);
//! a negative slot is padding and is skipped. Named `_ref` because the CPU backend's own copy lives
//! in `cpu::attention`. Tested in-module: written slots hold the rows, all others keep their content.

use crate::error::{check_len, invalid, ShapeError};

/// Writes row `t` of `key`/`value` to slot `slot_mapping[t]` of `key_cache`/`value_cache`.
pub fn reshape_and_cache_ref(
    key: &[f32],
    value: &[f32],
    key_cache: &mut [f32],
    value_cache: &mut [f32],
    slot_mapping: &[i64],
    row_len: usize,
) -> Result<(), ShapeError> {
    if row_len == 0 || !key_cache.len().is_multiple_of(row_len) {
        return Err(invalid(
            "row_len",
            format!("{row_len} does not divide the cache length {}", key_cache.len()),
        ));
    }
    check_len("key", slot_mapping.len() * row_len, key.len())?;
    check_len("value", key.len(), value.len())?;
    check_len("value_cache", key_cache.len(), value_cache.len())?;
    let num_slots = key_cache.len() / row_len;
    for (t, &slot) in slot_mapping.iter().enumerate() {
        if slot < 0 {
            continue;
        }
        let s = usize::try_from(slot).unwrap_or(usize::MAX);
        if s >= num_slots {
            return Err(invalid(
                "slot_mapping",
                format!("slot {slot} of token {t} >= {num_slots} slots"),
            ));
        }
        key_cache[s * row_len..(s + 1) * row_len].copy_from_slice(&key[t * row_len..(t + 1) * row_len]);
        value_cache[s * row_len..(s + 1) * row_len].copy_from_slice(&value[t * row_len..(t + 1) * row_len]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scatters_rows_and_skips_padding() {
        let row = 3;
        let key: Vec<f32> = (0..9).map(|v| v as f32).collect();
        let value: Vec<f32> = key.iter().map(|v| -v).collect();
        let (mut kc, mut vc) = (vec![f32::NAN; 5 * row], vec![f32::NAN; 5 * row]);
        reshape_and_cache_ref(&key, &value, &mut kc, &mut vc, &[4, -1, 0], row).unwrap();
        assert_eq!(kc[12..15], [0.0, 1.0, 2.0]);
        assert_eq!(vc[0..3], [-6.0, -7.0, -8.0]);
        assert!(
            kc[3..12].iter().all(|v| v.is_nan()),
            "untouched slots keep their content"
        );
        assert!(matches!(
            reshape_and_cache_ref(&key, &value, &mut kc, &mut vc, &[5, 0, 0], row),
            Err(ShapeError::Invalid {
                what: "slot_mapping",
                ..
            })
        ));
    }
}
