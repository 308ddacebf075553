//! Synthetic shapes from a seed: the same recipe as
//! `examples/distill_shapes.py`'s `make_split`, at the example's image size, with a small
//! PRNG of its own (so the pictures are not numpy's, but they are the same for a seed on
//! every machine).

/// Class names; class 0 of the detector is background, so these are 1..=3 there.
pub const CLASSES: [&str; 3] = ["rectangle", "ellipse", "triangle"];

/// xoshiro256** seeded through splitmix64: small, fast and reproducible.
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Self([next(), next(), next(), next()])
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform integer in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Normal with mean 0 and deviation `sd` (Box–Muller).
    pub fn normal(&mut self, sd: f32) -> f32 {
        let u1 = 1.0 - self.unit(); // (0, 1]
        let u2 = self.unit();
        sd * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }

    /// A random permutation of `0..n` (Fisher–Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, self.below(i + 1));
        }
        order
    }
}

/// One object: corners normalised to the image, and its class 0..=2.
#[derive(Clone, Copy, Debug)]
pub struct Object {
    pub bbox: [f32; 4],
    pub class: usize,
}

/// A split: `count` images of `size`×`size` pixels (u8, channel-major) and their objects.
pub struct Split {
    pub size: usize,
    pub pixels: Vec<u8>,
    pub objects: Vec<Vec<Object>>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.objects.len()
    }
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let ix = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let iy = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = ix * iy;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// Whether pixel centre (x, y) is inside a shape of `kind` drawn in box (x0, y0, w, h).
fn inside(kind: usize, x0: f32, y0: f32, w: f32, h: f32, x: f32, y: f32) -> bool {
    match kind {
        0 => x >= x0 && x < x0 + w && y >= y0 && y < y0 + h,
        1 => {
            let (cx, cy) = (x0 + w / 2.0, y0 + h / 2.0);
            let (dx, dy) = ((x - cx) / (w / 2.0), (y - cy) / (h / 2.0));
            dx * dx + dy * dy <= 1.0
        }
        _ => {
            // Apex at the top centre, base along the bottom of the box.
            let t = (y - y0) / h;
            (0.0..=1.0).contains(&t) && (x - (x0 + w / 2.0)).abs() <= (w / 2.0) * t
        }
    }
}

/// `count` images of 1–5 filled rectangles, ellipses and triangles in colours that stand
/// out, sometimes overlapping (no object hides most of another: IoU < 0.3), on textured
/// noise; all from `seed`.
pub fn make_split(count: usize, seed: u64, size: usize) -> Split {
    let mut rng = Rng::new(seed);
    let s = size as f32;
    // Objects span 11%..50% of the image side, as 14..64 px do on the Python example's 128.
    let (min_side, max_side) = (0.11 * s, 0.5 * s);
    let cell = size / 8;
    let mut pixels = vec![0u8; count * 3 * size * size];
    let mut objects = Vec::with_capacity(count);
    let mut image = vec![[0f32; 3]; size * size];
    for n in 0..count {
        let base = [0; 3].map(|_| rng.uniform(0.25, 0.75));
        let coarse: Vec<[f32; 3]> = (0..64).map(|_| [0; 3].map(|_| rng.normal(0.10))).collect();
        for (i, px) in image.iter_mut().enumerate() {
            let (y, x) = (i / size, i % size);
            let c = coarse[(y / cell).min(7) * 8 + (x / cell).min(7)];
            for (ch, v) in px.iter_mut().enumerate() {
                *v = base[ch] + c[ch] + rng.normal(0.06);
            }
        }
        let mut boxes: Vec<Object> = Vec::new();
        for _ in 0..1 + rng.below(5) {
            let mut placed = None;
            for _attempt in 0..20 {
                let (w, h) = (rng.uniform(min_side, max_side), rng.uniform(min_side, max_side));
                let (x0, y0) = (rng.uniform(0.0, s - w), rng.uniform(0.0, s - h));
                let bbox = [x0, y0, x0 + w, y0 + h];
                if boxes.iter().all(|o| iou(&bbox, &o.bbox.map(|v| v * s)) < 0.3) {
                    placed = Some((x0, y0, w, h));
                    break;
                }
            }
            let Some((x0, y0, w, h)) = placed else {
                continue;
            };
            let kind = rng.below(CLASSES.len());
            let colour = loop {
                let c = [0; 3].map(|_| rng.unit());
                if (0..3).any(|ch| (c[ch] - base[ch]).abs() > 0.35) {
                    break c;
                }
            };
            for (i, px) in image.iter_mut().enumerate() {
                let (y, x) = ((i / size) as f32 + 0.5, (i % size) as f32 + 0.5);
                if inside(kind, x0, y0, w, h, x, y) {
                    for (ch, v) in px.iter_mut().enumerate() {
                        *v = colour[ch] + rng.normal(0.03);
                    }
                }
            }
            boxes.push(Object { bbox: [x0 / s, y0 / s, (x0 + w) / s, (y0 + h) / s], class: kind });
        }
        let out = &mut pixels[n * 3 * size * size..(n + 1) * 3 * size * size];
        for (i, px) in image.iter().enumerate() {
            for (ch, v) in px.iter().enumerate() {
                out[ch * size * size + i] = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
        objects.push(boxes);
    }
    Split { size, pixels, objects }
}

/// One mini-batch on the host: images `[B, 3, S, S]` in [0, 1], targets `[B, M, 5]`
/// (SPEC §1: corners, label 0..=2; padding rows label −1), M ≥ 1.
pub struct HostBatch {
    pub len: usize,
    pub images: Vec<f32>,
    pub targets: Vec<f32>,
}

/// The images `indices` of `split`, each flipped left-right where `flips` says so (every
/// shape here is symmetric that way).
pub fn gather(split: &Split, indices: &[usize], flips: &[bool]) -> HostBatch {
    let size = split.size;
    let plane = size * size;
    let mut images = Vec::with_capacity(indices.len() * 3 * plane);
    let mut objects = Vec::with_capacity(indices.len());
    for (k, &i) in indices.iter().enumerate() {
        let flip = flips.get(k).copied().unwrap_or(false);
        let src = &split.pixels[i * 3 * plane..(i + 1) * 3 * plane];
        for row in src.chunks_exact(size) {
            if flip {
                images.extend(row.iter().rev().map(|&v| f32::from(v) / 255.0));
            } else {
                images.extend(row.iter().map(|&v| f32::from(v) / 255.0));
            }
        }
        objects.push(
            split.objects[i]
                .iter()
                .map(|o| {
                    let mut o = *o;
                    if flip {
                        o.bbox = [1.0 - o.bbox[2], o.bbox[1], 1.0 - o.bbox[0], o.bbox[3]];
                    }
                    o
                })
                .collect::<Vec<_>>(),
        );
    }
    let max_objects = objects.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut targets = Vec::with_capacity(indices.len() * max_objects * 5);
    for objs in &objects {
        for m in 0..max_objects {
            match objs.get(m) {
                Some(o) => {
                    targets.extend_from_slice(&o.bbox);
                    targets.push(o.class as f32);
                }
                None => targets.extend_from_slice(&[0.0, 0.0, 0.0, 0.0, -1.0]),
            }
        }
    }
    HostBatch { len: indices.len(), images, targets }
}
