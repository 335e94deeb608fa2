//! Rotary position embedding on the CPU, reference of `cuda/rotary.cu`.
//!
//! The cos/sin table is f32 `[max_position, rot_dim]`: cosines of `pos * base^(-2i/rot_dim)` for
//! `i < rot_dim/2`, then the sines ([`rope_cos_sin_cache`], computed in f64). The first `rot_dim`
//! dims of every head rotate by pairs; which dims pair up is the [`RopeLayout`]. Tested in-module
//! against the complex-number form (pair `(x, y)` as `x + iy`, multiplied by `e^{i·pos·θ}`) for both
//! layouts, partial rotary included.

use crate::error::{check_len, invalid, ShapeError};

/// Which dims of a head form a rotation pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// GPT-NeoX / Llama (HF): dim `i` pairs with `i + rot_dim/2`.
    Neox,
    /// GPT-J / original Llama (Meta): dims `2i` and `2i+1` pair up.
    Interleaved,
}

/// Shape of a rotary application: `query` is `[tokens, num_heads, head_dim]`, `key`
/// `[tokens, num_kv_heads, head_dim]`, and the first `rot_dim` (even, ≤ head_dim) dims rotate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rope {
    pub head_dim: usize,
    pub rot_dim: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub layout: RopeLayout,
}

impl Rope {
    /// Checks the shape and the buffers; returns the number of tokens.
    pub fn validate(
        &self,
        positions: &[u32],
        query_len: usize,
        key_len: usize,
        cache_len: usize,
    ) -> Result<usize, ShapeError> {
        if self.rot_dim == 0 || !self.rot_dim.is_multiple_of(2) || self.rot_dim > self.head_dim {
            return Err(invalid(
                "rot_dim",
                format!("{} must be even, > 0 and <= head_dim {}", self.rot_dim, self.head_dim),
            ));
        }
        let tokens = positions.len();
        check_len("query", tokens * self.num_heads * self.head_dim, query_len)?;
        check_len("key", tokens * self.num_kv_heads * self.head_dim, key_len)?;
        if !cache_len.is_multiple_of(self.rot_dim) {
            return Err(invalid(
                "cos_sin_cache",
                format!("length {cache_len} is not a multiple of rot_dim {}", self.rot_dim),
            ));
        }
        let max_pos = cache_len / self.rot_dim;
        if let Some(p) = positions.iter().find(|&&p| p as usize >= max_pos) {
            return Err(invalid(
                "positions",
                format!("position {p} >= cos/sin table length {max_pos}"),
            ));
        }
        Ok(tokens)
    }
}

/// The f32 `[max_position, rot_dim]` cos/sin table for frequency base `base`.
pub fn rope_cos_sin_cache(max_position: usize, rot_dim: usize, base: f32) -> Vec<f32> {
    let half = rot_dim / 2;
    let mut cache = Vec::with_capacity(max_position * rot_dim);
    for p in 0..max_position {
        let angles: Vec<f64> = (0..half)
            .map(|i| p as f64 * f64::from(base).powf(-2.0 * i as f64 / rot_dim as f64))
            .collect();
        cache.extend(angles.iter().map(|a| a.cos() as f32));
        cache.extend(angles.iter().map(|a| a.sin() as f32));
    }
    cache
}

fn rotate_head(head: &mut [f32], cs: &[f32], rot_dim: usize, layout: RopeLayout) {
    let half = rot_dim / 2;
    for i in 0..half {
        let (xi, yi) = match layout {
            RopeLayout::Neox => (i, i + half),
            RopeLayout::Interleaved => (2 * i, 2 * i + 1),
        };
        let (c, s) = (cs[i], cs[half + i]);
        let (x, y) = (head[xi], head[yi]);
        head[xi] = x * c - y * s;
        head[yi] = y * c + x * s;
    }
}

/// Rotates `query` and `key` in place by the angle of each token's position.
pub fn rotary_embedding(
    rope: &Rope,
    positions: &[u32],
    query: &mut [f32],
    key: &mut [f32],
    cos_sin_cache: &[f32],
) -> Result<(), ShapeError> {
    rope.validate(positions, query.len(), key.len(), cos_sin_cache.len())?;
    let hd = rope.head_dim;
    for (t, &p) in positions.iter().enumerate() {
        let cs = &cos_sin_cache[p as usize * rope.rot_dim..(p as usize + 1) * rope.rot_dim];
        for head in query[t * rope.num_heads * hd..(t + 1) * rope.num_heads * hd].chunks_exact_mut(hd) {
            rotate_head(head, cs, rope.rot_dim, rope.layout);
        }
        for head in key[t * rope.num_kv_heads * hd..(t + 1) * rope.num_kv_heads * hd].chunks_exact_mut(hd) {
            rotate_head(head, cs, rope.rot_dim, rope.layout);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// (x + iy) · e^{iθ} in f64, θ = pos · base^(-2i/rot_dim).
    fn complex_rotate(head: &[f32], pos: u32, rot_dim: usize, base: f64, layout: RopeLayout) -> Vec<f64> {
        let mut out: Vec<f64> = head.iter().map(|&v| f64::from(v)).collect();
        let half = rot_dim / 2;
        for i in 0..half {
            let (xi, yi) = match layout {
                RopeLayout::Neox => (i, i + half),
                RopeLayout::Interleaved => (2 * i, 2 * i + 1),
            };
            let theta = f64::from(pos) * base.powf(-2.0 * i as f64 / rot_dim as f64);
            let (re, im) = (out[xi], out[yi]);
            out[xi] = re * theta.cos() - im * theta.sin();
            out[yi] = re * theta.sin() + im * theta.cos();
        }
        out
    }

    #[test]
    fn both_layouts_match_complex_multiplication() {
        let mut rng = rand::rngs::StdRng::from_os_rng();
        for layout in [RopeLayout::Neox, RopeLayout::Interleaved] {
            for (head_dim, rot_dim) in [(64, 64), (128, 128), (64, 32)] {
                let rope = Rope {
                    head_dim,
                    rot_dim,
                    num_heads: 3,
                    num_kv_heads: 1,
                    layout,
                };
                let positions: Vec<u32> = (0..5).map(|_| rng.random_range(0..4096)).collect();
                let cache = rope_cos_sin_cache(4096, rot_dim, 10000.0);
                let q0: Vec<f32> = (0..5 * 3 * head_dim).map(|_| rng.random_range(-1.0..1.0)).collect();
                let k0: Vec<f32> = (0..5 * head_dim).map(|_| rng.random_range(-1.0..1.0)).collect();
                let (mut q, mut k) = (q0.clone(), k0.clone());
                rotary_embedding(&rope, &positions, &mut q, &mut k, &cache).unwrap();
                for (t, &p) in positions.iter().enumerate() {
                    for h in 0..3 {
                        let r = (t * 3 + h) * head_dim..(t * 3 + h + 1) * head_dim;
                        let want = complex_rotate(&q0[r.clone()], p, rot_dim, 10000.0, layout);
                        for (g, w) in q[r].iter().zip(&want) {
                            assert!((f64::from(*g) - w).abs() < 1e-5, "{layout:?} pos {p}: {g} vs {w}");
                        }
                    }
                    let r = t * head_dim..(t + 1) * head_dim;
                    let want = complex_rotate(&k0[r.clone()], p, rot_dim, 10000.0, layout);
                    for (g, w) in k[r].iter().zip(&want) {
                        assert!((f64::from(*g) - w).abs() < 1e-5);
                    }
                    // Dims past rot_dim pass through untouched.
                    assert_eq!(
                        k[t * head_dim + rot_dim..(t + 1) * head_dim],
                        k0[t * head_dim + rot_dim..(t + 1) * head_dim]
                    );
                }
            }
        }
    }

    #[test]
    fn position_zero_is_identity_and_bad_args_are_named() {
        let rope = Rope {
            head_dim: 4,
            rot_dim: 4,
            num_heads: 1,
            num_kv_heads: 1,
            layout: RopeLayout::Neox,
        };
        let cache = rope_cos_sin_cache(2, 4, 10000.0);
        let (mut q, mut k) = (vec![1.0, 2.0, 3.0, 4.0], vec![5.0, 6.0, 7.0, 8.0]);
        rotary_embedding(&rope, &[0], &mut q, &mut k, &cache).unwrap();
        assert_eq!(q, [1.0, 2.0, 3.0, 4.0]);
        assert!(matches!(
            rotary_embedding(&rope, &[2], &mut q, &mut k, &cache),
            Err(ShapeError::Invalid { what: "positions", .. })
        ));
        let odd = Rope { rot_dim: 3, ..rope };
        assert!(matches!(
            odd.validate(&[0], 4, 4, 8),
            Err(ShapeError::Invalid { what: "rot_dim", .. })
        ));
    }
}
