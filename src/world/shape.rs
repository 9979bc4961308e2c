//! The object shapes of the world, defined on the unit square.
//!
//! A shape is drawn inscribed in a square bounding box and recognised by comparing a blob
//! with each shape rasterised into the blob's own bounding box, so one definition
//! ([`Shape::mask`]) serves both the renderer and the detector.

/// An object shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    /// A disc touching all four sides of its box.
    Circle,
    /// The full box.
    Square,
    /// An isosceles triangle, apex at the top centre, base along the bottom.
    Triangle,
    /// A plus sign whose arms are about [`CROSS_ARM`] of the box wide.
    Cross,
}

/// Width of a cross's arms as a fraction of its box (snapped to whole pixels by
/// [`Shape::mask`]).
pub const CROSS_ARM: f32 = 0.3;

impl Shape {
    /// Every shape.
    pub const ALL: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Cross];

    /// The singular prompt word.
    pub fn word(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Cross => "cross",
        }
    }

    /// The colour a canonical scene ([`crate::world::render::Layout::Canonical`]) gives this
    /// shape when the prompt names none: one per shape, all different.
    pub fn default_colour(self) -> crate::world::palette::Colour {
        use crate::world::palette::Colour;
        match self {
            Shape::Circle => Colour::Red,
            Shape::Square => Colour::Blue,
            Shape::Triangle => Colour::Green,
            Shape::Cross => Colour::Yellow,
        }
    }

    /// The plural prompt word.
    pub fn plural(self) -> &'static str {
        match self {
            Shape::Circle => "circles",
            Shape::Square => "squares",
            Shape::Triangle => "triangles",
            Shape::Cross => "crosses",
        }
    }

    /// The shape a singular or plural word names, with `true` when the word is plural.
    pub fn from_word(word: &str) -> Option<(Self, bool)> {
        Self::ALL.into_iter().find_map(|s| {
            if s.word() == word {
                Some((s, false))
            } else if s.plural() == word {
                Some((s, true))
            } else {
                None
            }
        })
    }

    /// The shape rasterised into a `width` x `height` pixel box, row-major, in exact integer
    /// arithmetic (so masks are mirror-symmetric). With `(u, v)` the pixel centre in the unit
    /// box: a circle takes `(u - 1/2)^2 + (v - 1/2)^2 <= 1/4`; a square the whole box; a
    /// triangle `|u - 1/2| <= v' / 2` with `v'` the row's lower edge (so the apex row is never
    /// empty and every mask fills its box); a cross the column and row bands whose width,
    /// [`cross_arm_pixels`], is a whole number of pixels centred exactly. The renderer draws
    /// exactly this mask (hard edges) and the detector compares blobs against it.
    pub fn mask(self, width: usize, height: usize) -> Vec<bool> {
        let (w, h) = (width as i64, height as i64);
        let (arm_x, arm_y) = (cross_arm_pixels(width) as i64, cross_arm_pixels(height) as i64);
        (0..w * h)
            .map(|i| {
                let (px, py) = (i % w, i / w);
                // twice the offset of the pixel centre from the box centre
                let (dx, dy) = (2 * px + 1 - w, 2 * py + 1 - h);
                match self {
                    Shape::Circle => dx * dx * h * h + dy * dy * w * w <= w * w * h * h,
                    Shape::Square => true,
                    Shape::Triangle => dx.abs() * h <= (py + 1) * w,
                    Shape::Cross => dx.abs() < arm_x || dy.abs() < arm_y,
                }
            })
            .collect()
    }
}

/// Arm width in pixels of a cross `side` pixels wide: the whole number nearest to
/// `CROSS_ARM * side` that has the parity of `side`, so the arm is centred exactly.
pub fn cross_arm_pixels(side: usize) -> usize {
    let target = CROSS_ARM * side as f32;
    let lower = (target.floor() as usize..=side).find(|a| (side - a).is_multiple_of(2)).unwrap_or(side);
    let below = lower.checked_sub(2).filter(|&b| b > 0);
    match below {
        Some(b) if (target - b as f32).abs() <= (lower as f32 - target).abs() => b,
        _ => lower.max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iou(a: &[bool], b: &[bool]) -> f32 {
        let inter = a.iter().zip(b).filter(|(x, y)| **x && **y).count();
        let union = a.iter().zip(b).filter(|(x, y)| **x || **y).count();
        inter as f32 / union as f32
    }

    #[test]
    fn shapes_are_distinct_at_every_rendered_size() {
        for size in 8..=16 {
            for a in Shape::ALL {
                for b in Shape::ALL {
                    if a != b {
                        let overlap = iou(&a.mask(size, size), &b.mask(size, size));
                        assert!(overlap < 0.86, "{a:?} vs {b:?} at {size}px: IoU {overlap}");
                    }
                }
            }
        }
    }

    #[test]
    fn areas_match_the_geometry() {
        let area = |s: Shape| s.mask(64, 64).iter().filter(|&&m| m).count() as f32 / 4096.0;
        assert!((area(Shape::Circle) - std::f32::consts::FRAC_PI_4).abs() < 0.01);
        assert_eq!(area(Shape::Square), 1.0);
        assert!((area(Shape::Triangle) - 0.5).abs() < 0.02);
        assert!((area(Shape::Cross) - (2.0 * CROSS_ARM - CROSS_ARM * CROSS_ARM)).abs() < 0.04);
    }

    #[test]
    fn cross_arms_are_whole_centred_pixels() {
        let arms: Vec<usize> = (5..=16).map(cross_arm_pixels).collect();
        assert_eq!(arms, [1, 2, 3, 2, 3, 2, 3, 4, 3, 4, 5, 4]);
        // a 9-pixel cross: columns 3..6 and rows 3..6
        let mask = Shape::Cross.mask(9, 9);
        assert!(mask[4 * 9] && mask[4 * 9 + 8] && mask[4] && mask[8 * 9 + 4]);
        assert!(!mask[2 * 9 + 2] && mask[3 * 9 + 3] && !mask[0]);
    }

    #[test]
    fn every_mask_touches_all_four_sides_of_its_box() {
        for size in 5..=16 {
            for shape in Shape::ALL {
                let m = shape.mask(size, size);
                let row = |y: usize| (0..size).any(|x| m[y * size + x]);
                let column = |x: usize| (0..size).any(|y| m[y * size + x]);
                assert!(row(0) && row(size - 1) && column(0) && column(size - 1), "{shape:?} {size}");
            }
        }
    }

    #[test]
    fn words_round_trip_with_number() {
        for s in Shape::ALL {
            assert_eq!(Shape::from_word(s.word()), Some((s, false)));
            assert_eq!(Shape::from_word(s.plural()), Some((s, true)));
        }
        assert_eq!(Shape::from_word("dog"), None);
    }
}
