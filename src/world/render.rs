//! The procedural renderer: a prompt's [`Spec`] is laid out as a [`Scene`] (background,
//! placed objects, placed text), which draws into an [`Image32`].
//!
//! Layout is where the randomness lives (positions, sizes, unspecified colours,
//! backgrounds); drawing is a pure function of the scene. Ground truth per task:
//! - composition: every named object with its count and colour (random colours where the
//!   prompt names none), objects at least [`OBJECT_GAP`] pixels apart, relations satisfied
//!   with disjoint extents along the relation's axis; varied backgrounds (solid, gradient,
//!   light noise);
//! - text: the quoted string in the world font on a plain paper background (dark ink on pale,
//!   or light on dark);
//! - preference: one large centred subject in the asked palette temperature and brightness,
//!   on a smooth background;
//! - quality: crisp objects on a clean (solid or gradient) background.
//!
//! Objects are drawn hard-edged (no anti-aliasing): at 32 x 32 a blended edge pixel would be
//! neither background nor palette colour, and the detector's masks would depend on the
//! background's contrast.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::world::font::{Font, TEXT_HEIGHT, TEXT_SCALE, text_width};
use crate::world::grammar::{ParseError, parse};
use crate::world::image::{IMAGE_SIZE, Image32, Rgb};
use crate::world::palette::{BackgroundTone, Colour, hsv};
use crate::world::random::{below, chance, float_in, int_in, pick, unit};
use crate::world::shape::Shape;
use crate::world::spec::{
    CompositionSpec, Lighting, ObjectSpec, PreferenceSpec, QualitySpec, Relation, Spec, TextSpec, Warmth,
};

/// Minimum number of background pixels between the bounding boxes of two objects.
pub const OBJECT_GAP: usize = 2;
/// Minimum distance between an object and the image border.
pub const BORDER: usize = 1;
/// Smallest object size of a sampled layout (a crowded scene shrinks its objects down to
/// this). Below it a circle and a cross differ in too few pixels.
pub const MIN_OBJECT_SIZE: usize = 8;
/// Object size of the fixed-grid layout, the last resort for scenes too crowded to sample.
pub const GRID_OBJECT_SIZE: usize = 6;

/// Direction of a linear background gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradientDirection {
    /// Left to right.
    Horizontal,
    /// Top to bottom.
    Vertical,
    /// Top-left to bottom-right.
    Diagonal,
}

/// A scene background.
#[derive(Clone, Debug, PartialEq)]
pub enum Background {
    /// One colour.
    Solid(Rgb),
    /// A linear blend between two colours.
    Gradient {
        /// Colour at the start.
        from: Rgb,
        /// Colour at the end.
        to: Rgb,
        /// Direction of the blend.
        direction: GradientDirection,
    },
    /// A colour with independent uniform noise in `[-amplitude, amplitude]` on every channel
    /// of every pixel, drawn from a ChaCha8 stream seeded with `seed`.
    Noisy {
        /// Mean colour.
        base: Rgb,
        /// Noise half-range.
        amplitude: f32,
        /// Noise stream seed.
        seed: u64,
    },
}

impl Background {
    /// The background alone.
    pub fn draw(&self) -> Image32 {
        match *self {
            Background::Solid(c) => Image32::filled(c),
            Background::Gradient { from, to, direction } => Image32::from_fn(|x, y| {
                let last = (IMAGE_SIZE - 1) as f32;
                let t = match direction {
                    GradientDirection::Horizontal => x as f32 / last,
                    GradientDirection::Vertical => y as f32 / last,
                    GradientDirection::Diagonal => (x + y) as f32 / (2.0 * last),
                };
                [0, 1, 2].map(|c| from[c] + t * (to[c] - from[c]))
            }),
            Background::Noisy { base, amplitude, seed } => {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                Image32::from_fn(|_, _| base.map(|v| (v + amplitude * (2.0 * unit(&mut rng) - 1.0)).clamp(0.0, 1.0)))
            }
        }
    }

    /// Whether the background has per-pixel noise.
    pub fn is_noisy(&self) -> bool {
        matches!(self, Background::Noisy { .. })
    }
}

/// An object placed in a scene: `shape` inscribed in the `size` x `size` box whose top-left
/// pixel is `(x, y)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlacedObject {
    /// The shape.
    pub shape: Shape,
    /// The colour.
    pub colour: Colour,
    /// Left column of the box.
    pub x: usize,
    /// Top row of the box.
    pub y: usize,
    /// Side of the box in pixels.
    pub size: usize,
}

impl PlacedObject {
    /// Centre of the box in pixel coordinates (pixel `i` spans `[i, i + 1)`).
    pub fn centre(&self) -> (f32, f32) {
        (self.x as f32 + self.size as f32 / 2.0, self.y as f32 + self.size as f32 / 2.0)
    }

    fn draw(&self, image: &mut Image32) {
        let rgb = self.colour.rgb();
        let mask = self.shape.mask(self.size, self.size);
        for (i, _) in mask.iter().enumerate().filter(|(_, inside)| **inside) {
            let (ix, iy) = (self.x + i % self.size, self.y + i / self.size);
            if ix < IMAGE_SIZE && iy < IMAGE_SIZE {
                image.set(ix, iy, rgb);
            }
        }
    }
}

/// A string placed in a scene, top-left glyph corner at `(x, y)`.
#[derive(Clone, Debug, PartialEq)]
pub struct PlacedText {
    /// The characters (drawn with the built-in font).
    pub text: String,
    /// Left column of the first glyph.
    pub x: i32,
    /// Top row of the glyphs.
    pub y: i32,
    /// Ink colour.
    pub ink: Rgb,
}

/// Everything an image shows, before drawing.
#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    /// The background.
    pub background: Background,
    /// Objects, drawn in order.
    pub objects: Vec<PlacedObject>,
    /// Text, drawn last.
    pub text: Option<PlacedText>,
}

impl Scene {
    /// Draws the scene: background, then objects (their [`Shape::mask`], hard-edged), then
    /// text (glyph pixels).
    pub fn draw(&self) -> Image32 {
        let mut image = self.background.draw();
        for object in &self.objects {
            object.draw(&mut image);
        }
        if let Some(t) = &self.text {
            Font::builtin().draw(&mut image, &t.text, t.x, t.y, t.ink);
        }
        image
    }
}

/// Lays out a ground-truth scene for `spec`.
pub fn layout<R: RngCore + ?Sized>(spec: &Spec, rng: &mut R) -> Scene {
    layout_with(spec, Layout::Scattered, rng)
}

/// How a scene's objects and text are placed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// Anywhere in the image at random sizes, random colours where the prompt names none: the
    /// world as the rewards see it.
    #[default]
    Scattered,
    /// Fixed slots moved together by at most one pixel (one object centred; two side by side,
    /// or along the relation's axis; three in a row; four in a 2 x 2 grid), text centred, and
    /// each shape in its [`default colour`](Shape::default_colour) where the prompt names none.
    /// Pre-training on these teaches a tiny MMDiT to draw whole objects (on scattered scenes
    /// it learns each 4 x 4-pixel patch's colour but not where the object is, and samples
    /// patch soup); every canonical scene is also a valid scattered one.
    Canonical,
}

/// The scene for `spec` in the given [`Layout`].
pub fn layout_with<R: RngCore + ?Sized>(spec: &Spec, style: Layout, rng: &mut R) -> Scene {
    match (spec, style) {
        (Spec::Composition(c), Layout::Scattered) => composition_scene(c, rng),
        (Spec::Composition(c), Layout::Canonical) => canonical_composition_scene(c, rng),
        (Spec::Text(t), _) => text_scene(t, style, rng),
        (Spec::Preference(p), _) => preference_scene(p, rng),
        (Spec::Quality(q), Layout::Scattered) => quality_scene(q, rng),
        (Spec::Quality(q), Layout::Canonical) => canonical_quality_scene(q, rng),
    }
}

/// Draws `spec` in the given [`Layout`].
pub fn render_with<R: RngCore + ?Sized>(spec: &Spec, style: Layout, rng: &mut R) -> Image32 {
    layout_with(spec, style, rng).draw()
}

/// Renders a ground-truth image for `spec`.
pub fn render<R: RngCore + ?Sized>(spec: &Spec, rng: &mut R) -> Image32 {
    layout(spec, rng).draw()
}

/// Parses `prompt` and renders a ground-truth image for it.
pub fn render_prompt<R: RngCore + ?Sized>(prompt: &str, rng: &mut R) -> Result<Image32, ParseError> {
    Ok(render(&parse(prompt)?, rng))
}

/// A background of any kind (solid, gradient or light noise) and any desaturated tone, as
/// composition scenes use.
pub fn varied_background<R: RngCore + ?Sized>(rng: &mut R) -> Background {
    match below(rng, 3) {
        0 => Background::Solid(BackgroundTone::ANY.sample(rng)),
        1 => clean_gradient(BackgroundTone::ANY, rng),
        _ => noisy_background(BackgroundTone::ANY, rng),
    }
}

/// A solid or gradient background with no noise, as quality scenes use.
pub fn clean_background<R: RngCore + ?Sized>(rng: &mut R) -> Background {
    if chance(rng, 0.5) {
        Background::Solid(BackgroundTone::ANY.sample(rng))
    } else {
        clean_gradient(BackgroundTone::ANY, rng)
    }
}

/// A background of `tone` with light noise (amplitude 0.02 to 0.05).
pub fn noisy_background<R: RngCore + ?Sized>(tone: BackgroundTone, rng: &mut R) -> Background {
    Background::Noisy { base: tone.sample(rng), amplitude: float_in(rng, 0.02, 0.05), seed: rng.next_u64() }
}

fn clean_gradient<R: RngCore + ?Sized>(tone: BackgroundTone, rng: &mut R) -> Background {
    let direction =
        *pick(rng, &[GradientDirection::Horizontal, GradientDirection::Vertical, GradientDirection::Diagonal]);
    Background::Gradient { from: tone.sample(rng), to: tone.sample(rng), direction }
}

fn composition_scene<R: RngCore + ?Sized>(c: &CompositionSpec, rng: &mut R) -> Scene {
    let groups = c.objects();
    let total: usize = groups.iter().map(ObjectSpec::count).sum();
    let (lo, hi) = if total >= 3 { (8, 9) } else { (8, 12) };
    let mut kinds = Vec::with_capacity(total);
    let mut group_of = Vec::with_capacity(total);
    for (g, object) in groups.iter().enumerate() {
        let shared = object.colour.or_else(|| chance(rng, 0.5).then(|| *pick(rng, &Colour::ALL)));
        for _ in 0..object.count() {
            let colour = shared.unwrap_or_else(|| *pick(rng, &Colour::ALL));
            kinds.push((object.shape, colour));
            group_of.push(g);
        }
    }
    let sizes: Vec<usize> = (0..total).map(|_| int_in(rng, lo, hi) as usize).collect();
    let background = varied_background(rng);
    let objects = place(&kinds, &sizes, &group_of, c.relation(), rng);
    Scene { background, objects, text: None }
}

fn text_scene<R: RngCore + ?Sized>(t: &TextSpec, style: Layout, rng: &mut R) -> Scene {
    let dark_ink = chance(rng, 0.75);
    let (tone, ink) = if dark_ink {
        (BackgroundTone::PALE, hsv(360.0 * unit(rng), float_in(rng, 0.0, 0.6), float_in(rng, 0.02, 0.2)))
    } else {
        (BackgroundTone::DARK, hsv(360.0 * unit(rng), float_in(rng, 0.0, 0.15), float_in(rng, 0.88, 1.0)))
    };
    let background = match below(rng, 3) {
        0 => Background::Solid(tone.sample(rng)),
        1 => clean_gradient(tone, rng),
        _ => noisy_background(tone, rng),
    };
    let width = text_width(t.text.chars().count()) as i32;
    let (x, y) = match style {
        Layout::Scattered => {
            (int_in(rng, 2, IMAGE_SIZE as i32 - 2 - width), int_in(rng, 2, (IMAGE_SIZE - 2 - TEXT_HEIGHT) as i32))
        }
        Layout::Canonical => {
            // centred, snapped to the font-pixel grid (even pixels, so each font pixel is one
            // latent pixel of the codec) and moved by at most one font pixel
            let s = TEXT_SCALE as i32;
            let (dx, dy) = (s * int_in(rng, -1, 1), s * int_in(rng, -1, 1));
            let snap = |v: i32| v / s * s;
            (snap((IMAGE_SIZE as i32 - width) / 2) + dx, snap((IMAGE_SIZE - TEXT_HEIGHT) as i32 / 2) + dy)
        }
    };
    Scene { background, objects: Vec::new(), text: Some(PlacedText { text: t.text.clone(), x, y, ink }) }
}

/// The background tone a preference style asks for.
pub fn style_tone(warmth: Option<Warmth>, lighting: Option<Lighting>) -> BackgroundTone {
    let (hue, saturation) = match warmth {
        Some(Warmth::Warm) => (Some((15.0, 50.0)), (0.15, 0.3)),
        Some(Warmth::Cool) => (Some((190.0, 230.0)), (0.15, 0.3)),
        None => (None, (0.0, 0.1)),
    };
    let value = match lighting {
        Some(Lighting::Bright) => (0.82, 0.95),
        Some(Lighting::Dark) => (0.1, 0.22),
        None => (0.45, 0.75),
    };
    BackgroundTone { hue, saturation, value }
}

/// Palette colours that suit a temperature (all colours when none is asked for).
pub fn style_colours(warmth: Option<Warmth>) -> &'static [Colour] {
    match warmth {
        Some(Warmth::Warm) => &Colour::WARM,
        Some(Warmth::Cool) => &Colour::COOL,
        None => &Colour::ALL,
    }
}

fn preference_scene<R: RngCore + ?Sized>(p: &PreferenceSpec, rng: &mut R) -> Scene {
    let tone = style_tone(p.style.warmth, p.style.lighting);
    let base = tone.sample(rng);
    let background = if p.style.soft_background || chance(rng, 0.5) {
        // a gentle vertical shade of the base colour
        let shade = float_in(rng, 0.03, 0.06);
        let to = base.map(|v| (v - shade).clamp(0.0, 1.0));
        Background::Gradient { from: base, to, direction: GradientDirection::Vertical }
    } else {
        Background::Solid(base)
    };
    let colour = p.subject.colour.unwrap_or_else(|| *pick(rng, style_colours(p.style.warmth)));
    let count = p.subject.count();
    let objects = if count == 1 {
        let size = int_in(rng, 12, 15) as usize;
        let at = (IMAGE_SIZE - size) / 2;
        vec![PlacedObject { shape: p.subject.shape, colour, x: at, y: at, size }]
    } else {
        let kinds = vec![(p.subject.shape, colour); count];
        let sizes: Vec<usize> = (0..count).map(|_| int_in(rng, 8, 9) as usize).collect();
        place(&kinds, &sizes, &vec![0; count], None, rng)
    };
    Scene { background, objects, text: None }
}

fn quality_scene<R: RngCore + ?Sized>(q: &QualitySpec, rng: &mut R) -> Scene {
    let background = clean_background(rng);
    let kinds: Vec<(Shape, Colour)> = match q {
        QualitySpec::Described { subject, .. } => {
            let colour = subject.colour.unwrap_or_else(|| *pick(rng, &Colour::ALL));
            vec![(subject.shape, colour); subject.count()]
        }
        QualitySpec::AnImage => {
            (0..int_in(rng, 1, 2)).map(|_| (*pick(rng, &Shape::ALL), *pick(rng, &Colour::ALL))).collect()
        }
    };
    let (lo, hi) = if kinds.len() >= 3 { (8, 9) } else { (8, 13) };
    let sizes: Vec<usize> = kinds.iter().map(|_| int_in(rng, lo, hi) as usize).collect();
    let objects = place(&kinds, &sizes, &vec![0; kinds.len()], None, rng);
    Scene { background, objects, text: None }
}

/// The canonical scene of a composition: [`canonical_boxes`] when they exist for the scene's
/// objects, else the scattered placement.
fn canonical_composition_scene<R: RngCore + ?Sized>(c: &CompositionSpec, rng: &mut R) -> Scene {
    let mut kinds = Vec::new();
    let mut group_of = Vec::new();
    for (g, object) in c.objects().iter().enumerate() {
        let colour = object.colour.unwrap_or(object.shape.default_colour());
        kinds.extend(std::iter::repeat_n((object.shape, colour), object.count()));
        group_of.extend(std::iter::repeat_n(g, object.count()));
    }
    let background = varied_background(rng);
    Scene { background, objects: canonical_objects(&kinds, &group_of, c.relation(), rng), text: None }
}

/// The canonical scene of a quality prompt: its objects in the canonical slots.
fn canonical_quality_scene<R: RngCore + ?Sized>(q: &QualitySpec, rng: &mut R) -> Scene {
    let kinds: Vec<(Shape, Colour)> = match q {
        QualitySpec::Described { subject, .. } => {
            vec![(subject.shape, subject.colour.unwrap_or(subject.shape.default_colour())); subject.count()]
        }
        QualitySpec::AnImage => (0..int_in(rng, 1, 2))
            .map(|_| *pick(rng, &Shape::ALL))
            .map(|shape| (shape, shape.default_colour()))
            .collect(),
    };
    let background = clean_background(rng);
    Scene { background, objects: canonical_objects(&kinds, &vec![0; kinds.len()], None, rng), text: None }
}

/// `kinds` in [`canonical_boxes`], all moved by the same offset of -1, 0 or 1 pixel per axis
/// (the slots leave room for it); scenes without canonical boxes are placed at random.
fn canonical_objects<R: RngCore + ?Sized>(
    kinds: &[(Shape, Colour)],
    group_of: &[usize],
    relation: Option<Relation>,
    rng: &mut R,
) -> Vec<PlacedObject> {
    let Some(boxes) = canonical_boxes(group_of, relation) else {
        let sizes = vec![MIN_OBJECT_SIZE; kinds.len()];
        return place(kinds, &sizes, group_of, relation, rng);
    };
    let (dx, dy) = (int_in(rng, -1, 1), int_in(rng, -1, 1));
    boxes
        .into_iter()
        .zip(kinds)
        .map(|((x, y, size), &(shape, colour))| PlacedObject {
            shape,
            colour,
            x: (x as i32 + dx) as usize,
            y: (y as i32 + dy) as usize,
            size,
        })
        .collect()
}

/// The fixed `(x, y, size)` slots of the canonical layout for objects of the given groups
/// (`group_of[i]` is 0 or 1), before the shared one-pixel jitter: one object centred (size 12);
/// two side by side (11), or the first group's object on the relation's side of the second's;
/// three in a row (8); four in a 2 x 2 grid (10). `None` for other scenes (more than four
/// objects, or a relation between groups of several objects).
pub fn canonical_boxes(group_of: &[usize], relation: Option<Relation>) -> Option<Vec<(usize, usize, usize)>> {
    let (left, right, top, bottom) = ((3, 10, 11), (18, 10, 11), (10, 3, 11), (10, 18, 11));
    match (relation, group_of) {
        (Some(r), [0, 1]) => Some(match r {
            Relation::LeftOf => vec![left, right],
            Relation::RightOf => vec![right, left],
            Relation::Above => vec![top, bottom],
            Relation::Below => vec![bottom, top],
        }),
        (Some(_), _) => None,
        (None, [_]) => Some(vec![(10, 10, 12)]),
        (None, [_, _]) => Some(vec![left, right]),
        (None, [_, _, _]) => Some(vec![(2, 12, 8), (12, 12, 8), (22, 12, 8)]),
        (None, [_, _, _, _]) => Some(vec![(4, 4, 10), (18, 4, 10), (4, 18, 10), (18, 18, 10)]),
        (None, _) => None,
    }
}

fn separated(a: (usize, usize, usize), b: (usize, usize, usize)) -> bool {
    let (ax, ay, asz) = a;
    let (bx, by, bsz) = b;
    ax + asz + OBJECT_GAP <= bx
        || bx + bsz + OBJECT_GAP <= ax
        || ay + asz + OBJECT_GAP <= by
        || by + bsz + OBJECT_GAP <= ay
}

/// Whether box `a` stands in `relation` to box `b` with disjoint extents on that axis.
fn related(relation: Relation, a: (usize, usize, usize), b: (usize, usize, usize)) -> bool {
    let (ax, ay, asz) = a;
    let (bx, by, bsz) = b;
    match relation {
        Relation::LeftOf => ax + asz + OBJECT_GAP <= bx,
        Relation::RightOf => bx + bsz + OBJECT_GAP <= ax,
        Relation::Above => ay + asz + OBJECT_GAP <= by,
        Relation::Below => by + bsz + OBJECT_GAP <= ay,
    }
}

/// Places objects (`kinds[i]` of side `sizes[i]`, in group `group_of[i]`) so that all keep
/// [`OBJECT_GAP`] and [`BORDER`], and every group-0 object stands in `relation` to every
/// group-1 object. Random placement, retried; a crowded scene shrinks its objects; as a last
/// resort a fixed 4 x 4 grid of 8-pixel cells (objects of [`GRID_OBJECT_SIZE`]) is used, which
/// always satisfies the constraints for up to 8 objects (4 per group).
fn place<R: RngCore + ?Sized>(
    kinds: &[(Shape, Colour)],
    sizes: &[usize],
    group_of: &[usize],
    relation: Option<Relation>,
    rng: &mut R,
) -> Vec<PlacedObject> {
    let n = kinds.len();
    let valid = |boxes: &[(usize, usize, usize)]| {
        (0..n).all(|i| {
            (i + 1..n).all(|j| {
                separated(boxes[i], boxes[j])
                    && match (relation, group_of[i], group_of[j]) {
                        (Some(r), 0, 1) => related(r, boxes[i], boxes[j]),
                        (Some(r), 1, 0) => related(r, boxes[j], boxes[i]),
                        _ => true,
                    }
            })
        })
    };
    let build = |boxes: Vec<(usize, usize, usize)>| {
        boxes
            .into_iter()
            .zip(kinds)
            .map(|((x, y, size), &(shape, colour))| PlacedObject { shape, colour, x, y, size })
            .collect()
    };
    for shrink in 0..4 {
        let shrunk: Vec<usize> = sizes.iter().map(|&s| s.saturating_sub(shrink).max(MIN_OBJECT_SIZE)).collect();
        for _ in 0..150 {
            let boxes: Vec<(usize, usize, usize)> = shrunk
                .iter()
                .map(|&s| {
                    let span = (IMAGE_SIZE - BORDER - s) as i32;
                    (int_in(rng, BORDER as i32, span) as usize, int_in(rng, BORDER as i32, span) as usize, s)
                })
                .collect();
            if valid(&boxes) {
                return build(boxes);
            }
        }
    }
    // Fixed grid: group 0 and group 1 take opposite halves along the relation's axis.
    let cells: Vec<(usize, usize)> = (0..16).map(|i| (i % 4, i / 4)).collect();
    let in_half = |g: usize, (cx, cy): (usize, usize)| match relation {
        None => true,
        Some(Relation::LeftOf) => (cx < 2) == (g == 0),
        Some(Relation::RightOf) => (cx >= 2) == (g == 0),
        Some(Relation::Above) => (cy < 2) == (g == 0),
        Some(Relation::Below) => (cy >= 2) == (g == 0),
    };
    let mut used = [false; 16];
    let boxes = (0..n)
        .map(|i| {
            let k = (0..16)
                .find(|&k| !used[k] && in_half(group_of[i], cells[k]))
                .expect("a group of at most 4 objects fits its half of the grid");
            used[k] = true;
            (cells[k].0 * 8 + 1, cells[k].1 * 8 + 1, GRID_OBJECT_SIZE)
        })
        .collect();
    build(boxes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::palette::quantise;
    use crate::world::spec::{Link, Style, TextTemplate};

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    fn composition(text: &str) -> CompositionSpec {
        match parse(text).unwrap() {
            Spec::Composition(c) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn composition_layout_honours_counts_colours_gaps_and_relations() {
        let spec = composition("a photo of two red squares left of a blue cross");
        for seed in 0..200 {
            let scene = composition_scene(&spec, &mut rng(seed));
            assert_eq!(scene.objects.len(), 3);
            let (reds, blues): (Vec<&PlacedObject>, Vec<&PlacedObject>) =
                scene.objects.iter().partition(|o| o.colour == Colour::Red);
            assert_eq!(reds.len(), 2, "seed {seed}");
            assert!(reds.iter().all(|o| o.shape == Shape::Square));
            assert_eq!(blues[0].shape, Shape::Cross);
            for r in &reds {
                assert!(r.x + r.size + OBJECT_GAP <= blues[0].x, "seed {seed}: {scene:?}");
            }
            for (i, a) in scene.objects.iter().enumerate() {
                assert!(a.x >= BORDER && a.x + a.size + BORDER <= IMAGE_SIZE);
                assert!(a.y >= BORDER && a.y + a.size + BORDER <= IMAGE_SIZE);
                for b in &scene.objects[i + 1..] {
                    assert!(separated((a.x, a.y, a.size), (b.x, b.y, b.size)), "seed {seed}");
                }
            }
        }
    }

    #[test]
    fn canonical_slots_keep_borders_gaps_and_relations_under_any_jitter() {
        let relations = [None, Some(Relation::LeftOf), Some(Relation::RightOf), Some(Relation::Above), Some(Relation::Below)];
        let groups: [&[usize]; 5] = [&[0], &[0, 1], &[0, 0], &[0, 0, 0], &[0, 0, 0, 0]];
        for relation in relations {
            for group_of in groups {
                let Some(boxes) = canonical_boxes(group_of, relation) else {
                    assert!(relation.is_some() && group_of != [0, 1], "{relation:?} {group_of:?} has no slots");
                    continue;
                };
                assert_eq!(boxes.len(), group_of.len());
                for (dx, dy) in [(-1, -1), (1, 1), (-1, 1), (1, -1)] {
                    let moved: Vec<_> = boxes
                        .iter()
                        .map(|&(x, y, s)| ((x as i32 + dx) as usize, (y as i32 + dy) as usize, s))
                        .collect();
                    for (i, &(x, y, size)) in moved.iter().enumerate() {
                        assert!(size >= MIN_OBJECT_SIZE);
                        assert!(x >= BORDER && x + size + BORDER <= IMAGE_SIZE, "{relation:?} {group_of:?}");
                        assert!(y >= BORDER && y + size + BORDER <= IMAGE_SIZE, "{relation:?} {group_of:?}");
                        for &other in &moved[i + 1..] {
                            assert!(separated((x, y, size), other), "{relation:?} {group_of:?}");
                        }
                    }
                    if let Some(r) = relation {
                        assert!(related(r, moved[0], moved[1]), "{r:?}");
                    }
                }
            }
        }
        let single = canonical_boxes(&[0], None).unwrap()[0];
        assert_eq!(single.0 * 2 + single.2, IMAGE_SIZE, "one object is centred");
    }

    #[test]
    fn crowded_relations_fall_back_to_the_grid() {
        // four above four cannot always be sampled at full size; every layout must still hold
        let spec = CompositionSpec {
            first: ObjectSpec { number: Some(4), colour: Some(Colour::Green), shape: Shape::Circle },
            second: Some((
                Link::Relation(Relation::Above),
                ObjectSpec { number: Some(4), colour: Some(Colour::Purple), shape: Shape::Triangle },
            )),
        };
        for seed in 0..20 {
            let scene = composition_scene(&spec, &mut rng(seed));
            assert_eq!(scene.objects.len(), 8);
            for a in scene.objects.iter().filter(|o| o.colour == Colour::Green) {
                for b in scene.objects.iter().filter(|o| o.colour == Colour::Purple) {
                    assert!(related(Relation::Above, (a.x, a.y, a.size), (b.x, b.y, b.size)));
                }
            }
        }
    }

    #[test]
    fn backgrounds_never_look_like_objects() {
        let mut r = rng(7);
        for _ in 0..300 {
            let img = varied_background(&mut r).draw();
            assert!(img.pixels().iter().all(|&p| quantise(p).is_none()));
        }
    }

    #[test]
    fn text_scene_fits_the_string_inside_the_margins() {
        use crate::world::font::MAX_TEXT_LEN;
        for text in ["W", "WZ"] {
            let spec = TextSpec { template: TextTemplate::Label, text: text.into() };
            let width = text_width(text.len());
            assert!(text.len() <= MAX_TEXT_LEN);
            for seed in 0..200 {
                for style in [Layout::Scattered, Layout::Canonical] {
                    let t = text_scene(&spec, style, &mut rng(seed)).text.unwrap();
                    assert!(t.x >= 2 && t.x as usize + width + 2 <= IMAGE_SIZE, "{text} {style:?}: x {}", t.x);
                    assert!(t.y >= 2 && t.y as usize + TEXT_HEIGHT + 2 <= IMAGE_SIZE, "{text} {style:?}: y {}", t.y);
                    if style == Layout::Canonical {
                        // on the font-pixel grid, within one font pixel of the centre
                        assert!(t.x % TEXT_SCALE as i32 == 0 && t.y % TEXT_SCALE as i32 == 0, "({}, {})", t.x, t.y);
                        let centre = (2 * t.x + width as i32 - IMAGE_SIZE as i32).abs();
                        assert!(centre <= 2 * (TEXT_SCALE as i32 + 1), "{text}: x {}", t.x);
                    }
                }
            }
        }
    }

    #[test]
    fn preference_scene_centres_a_subject_of_the_asked_temperature() {
        let spec = PreferenceSpec {
            style: Style { warmth: Some(Warmth::Cool), lighting: Some(Lighting::Dark), ..Style::default() },
            subject: ObjectSpec::a(Shape::Circle),
        };
        for seed in 0..50 {
            let scene = preference_scene(&spec, &mut rng(seed));
            let o = scene.objects[0];
            assert!(Colour::COOL.contains(&o.colour));
            let (cx, cy) = o.centre();
            assert!((cx - 16.0).abs() <= 0.5 && (cy - 16.0).abs() <= 0.5);
            let img = scene.draw();
            let corner = img.get(0, 0);
            assert!(corner[2] > corner[0], "cool background {corner:?}");
            assert!(crate::world::image::luminance(corner) < 0.25, "dark background {corner:?}");
        }
    }

    #[test]
    fn drawing_is_deterministic_and_hard_edged() {
        let scene = Scene {
            background: Background::Noisy { base: [0.5; 3], amplitude: 0.04, seed: 9 },
            objects: vec![PlacedObject { shape: Shape::Circle, colour: Colour::Blue, x: 8, y: 8, size: 12 }],
            text: None,
        };
        assert_eq!(scene.draw(), scene.draw());
        let img = scene.draw();
        let mask = Shape::Circle.mask(12, 12);
        for (i, &inside) in mask.iter().enumerate() {
            let p = img.get(8 + i % 12, 8 + i / 12);
            assert_eq!(p == Colour::Blue.rgb(), inside, "pixel {i} of the box");
        }
    }
}
