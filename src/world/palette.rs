//! The object colour palette and its quantiser.
//!
//! Six saturated colours spread around the hue circle, every pair more than twice
//! [`QUANTISE_DISTANCE`] apart in RGB, so nearest-colour quantisation separates them even
//! after some blur. Backgrounds are kept desaturated and at least
//! [`BACKGROUND_CLEARANCE`] away from every palette colour, so a pixel that quantises to a
//! palette colour belongs to an object.

use rand::RngCore;

use crate::world::image::{Rgb, colour_distance};
use crate::world::random::{float_in, unit};

/// An object colour of the world.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    /// `(0.90, 0.12, 0.12)`.
    Red,
    /// `(0.95, 0.85, 0.10)`.
    Yellow,
    /// `(0.12, 0.72, 0.18)`.
    Green,
    /// `(0.12, 0.88, 0.92)`.
    Cyan,
    /// `(0.10, 0.15, 0.88)`.
    Blue,
    /// `(0.82, 0.12, 0.88)` (a magenta purple, to stay far from blue and red).
    Purple,
}

/// Pixels within this RGB distance of a palette colour quantise to it.
pub const QUANTISE_DISTANCE: f32 = 0.35;
/// Minimum RGB distance between a background colour and every palette colour.
pub const BACKGROUND_CLEARANCE: f32 = 0.5;

impl Colour {
    /// Every colour, in palette order.
    pub const ALL: [Colour; 6] =
        [Colour::Red, Colour::Yellow, Colour::Green, Colour::Cyan, Colour::Blue, Colour::Purple];
    /// Colours that read as warm (used by warm-styled scenes).
    pub const WARM: [Colour; 2] = [Colour::Red, Colour::Yellow];
    /// Colours that read as cool (used by cool-styled scenes).
    pub const COOL: [Colour; 2] = [Colour::Cyan, Colour::Blue];

    /// The prompt word.
    pub fn word(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Yellow => "yellow",
            Colour::Green => "green",
            Colour::Cyan => "cyan",
            Colour::Blue => "blue",
            Colour::Purple => "purple",
        }
    }

    /// The colour a prompt word names.
    pub fn from_word(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.word() == word)
    }

    /// The rendered RGB value.
    pub fn rgb(self) -> Rgb {
        match self {
            Colour::Red => [0.90, 0.12, 0.12],
            Colour::Yellow => [0.95, 0.85, 0.10],
            Colour::Green => [0.12, 0.72, 0.18],
            Colour::Cyan => [0.12, 0.88, 0.92],
            Colour::Blue => [0.10, 0.15, 0.88],
            Colour::Purple => [0.82, 0.12, 0.88],
        }
    }
}

/// The palette colour nearest to `c`, if it lies within [`QUANTISE_DISTANCE`].
pub fn quantise(c: Rgb) -> Option<Colour> {
    let (best, distance) = Colour::ALL
        .into_iter()
        .map(|k| (k, colour_distance(c, k.rgb())))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("palette is not empty");
    (distance < QUANTISE_DISTANCE).then_some(best)
}

/// HSV to RGB: hue in degrees, saturation and value in `[0, 1]`.
pub fn hsv(hue: f32, saturation: f32, value: f32) -> Rgb {
    let h = hue.rem_euclid(360.0) / 60.0;
    let c = value * saturation;
    let x = c * (1.0 - (h % 2.0 - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = value - c;
    [r + m, g + m, b + m]
}

/// Where a background colour may be drawn from: a hue interval (degrees, `None` for any),
/// a saturation interval and a value (brightness) interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackgroundTone {
    /// Hue interval in degrees (may wrap past 360), or any hue.
    pub hue: Option<(f32, f32)>,
    /// Saturation interval.
    pub saturation: (f32, f32),
    /// Value interval.
    pub value: (f32, f32),
}

impl BackgroundTone {
    /// Any desaturated colour of any brightness.
    pub const ANY: BackgroundTone = BackgroundTone { hue: None, saturation: (0.0, 0.2), value: (0.1, 0.95) };
    /// Pale paper colours (for dark text).
    pub const PALE: BackgroundTone = BackgroundTone { hue: None, saturation: (0.0, 0.15), value: (0.8, 0.97) };
    /// Dark slate colours (for light text).
    pub const DARK: BackgroundTone = BackgroundTone { hue: None, saturation: (0.0, 0.2), value: (0.08, 0.25) };

    /// Draws a colour from this tone that keeps [`BACKGROUND_CLEARANCE`] from the palette
    /// (rejection sampling; after 64 misses the grey of the drawn value is used).
    pub fn sample<R: RngCore + ?Sized>(&self, rng: &mut R) -> Rgb {
        let mut value = self.value.0;
        for _ in 0..64 {
            let hue = match self.hue {
                Some((lo, hi)) => float_in(rng, lo, hi),
                None => 360.0 * unit(rng),
            };
            let saturation = float_in(rng, self.saturation.0, self.saturation.1);
            value = float_in(rng, self.value.0, self.value.1);
            let c = hsv(hue, saturation, value);
            if is_clear_of_palette(c) {
                return c;
            }
        }
        [value; 3]
    }
}

/// Whether `c` keeps [`BACKGROUND_CLEARANCE`] from every palette colour.
pub fn is_clear_of_palette(c: Rgb) -> bool {
    Colour::ALL.iter().all(|k| colour_distance(c, k.rgb()) >= BACKGROUND_CLEARANCE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn palette_colours_are_far_apart_and_quantise_to_themselves() {
        for a in Colour::ALL {
            assert_eq!(quantise(a.rgb()), Some(a));
            assert_eq!(Colour::from_word(a.word()), Some(a));
            for b in Colour::ALL {
                if a != b {
                    let d = colour_distance(a.rgb(), b.rgb());
                    assert!(d > 2.0 * QUANTISE_DISTANCE, "{a:?}-{b:?} only {d} apart");
                }
            }
        }
    }

    #[test]
    fn sampled_backgrounds_never_quantise_to_the_palette() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for tone in [BackgroundTone::ANY, BackgroundTone::PALE, BackgroundTone::DARK] {
            for _ in 0..2_000 {
                let c = tone.sample(&mut rng);
                assert!(is_clear_of_palette(c), "{c:?}");
                // a background with light noise (0.05 a channel) still quantises to nothing
                assert_eq!(quantise([c[0] + 0.05, c[1] - 0.05, c[2] + 0.05]), None, "{c:?}");
            }
        }
    }

    #[test]
    fn hsv_matches_known_values() {
        assert_eq!(hsv(0.0, 1.0, 1.0), [1.0, 0.0, 0.0]);
        assert_eq!(hsv(120.0, 1.0, 1.0), [0.0, 1.0, 0.0]);
        assert_eq!(hsv(240.0, 1.0, 0.5), [0.0, 0.0, 0.5]);
        assert_eq!(hsv(77.0, 0.0, 0.3), [0.3, 0.3, 0.3]);
    }
}
