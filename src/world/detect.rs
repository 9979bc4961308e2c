//! The world's object detector: palette quantisation, connected components and shape
//! classification by mask overlap (the stand-in for GenEval's Mask2Former detector).
//!
//! 1. Each pixel is quantised to the nearest palette colour within
//!    [`QUANTISE_DISTANCE`](crate::world::palette::QUANTISE_DISTANCE), or to nothing
//!    (background, ink, smear).
//! 2. 4-connected components of equal colour with at least [`MIN_OBJECT_AREA`] pixels are
//!    objects.
//! 3. The shape is the one whose rasterisation into the component's bounding box overlaps the
//!    component best (intersection over union); fits below [`MIN_SHAPE_FIT`], boxes thinner than
//!    [`MIN_SHAPE_SIDE`] or more elongated than [`MAX_ASPECT`] have no shape.

use crate::world::image::{IMAGE_SIZE, Image32, PIXELS};
use crate::world::palette::{Colour, quantise};
use crate::world::shape::Shape;

/// Components smaller than this many pixels are ignored as specks.
pub const MIN_OBJECT_AREA: usize = 6;
/// Minimum intersection over union for a component to be given a shape.
pub const MIN_SHAPE_FIT: f32 = 0.6;
/// Minimum bounding-box side for a component to be given a shape.
pub const MIN_SHAPE_SIDE: usize = 3;
/// Maximum ratio of the longer to the shorter bounding-box side for a shape.
pub const MAX_ASPECT: f32 = 1.6;

/// An axis-aligned pixel box, `x0..x1` by `y0..y1` (end-exclusive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoundingBox {
    /// First column.
    pub x0: usize,
    /// First row.
    pub y0: usize,
    /// One past the last column.
    pub x1: usize,
    /// One past the last row.
    pub y1: usize,
}

impl BoundingBox {
    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.x1 - self.x0
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.y1 - self.y0
    }
}

/// One detected object.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DetectedObject {
    /// Palette colour of the component.
    pub colour: Colour,
    /// Best-fitting shape, or `None` if nothing fits well enough.
    pub shape: Option<Shape>,
    /// Intersection over union of the component with the best shape's mask.
    pub shape_fit: f32,
    /// Intersection over union of the component with each shape's mask, in the order of
    /// [`Shape::ALL`] (see [`DetectedObject::fit`]).
    pub fits: [f32; 4],
    /// Number of pixels.
    pub area: usize,
    /// Bounding box.
    pub bbox: BoundingBox,
    /// Mean pixel centre `(x, y)` (pixel `i` spans `[i, i + 1)`).
    pub centroid: (f32, f32),
}

/// The palette colour of every pixel (row-major), `None` where no colour is near.
pub fn colour_map(image: &Image32) -> Vec<Option<Colour>> {
    image.pixels().iter().map(|&p| quantise(p)).collect()
}

/// Detects the objects of an image, in raster order of their first pixel.
pub fn detect_objects(image: &Image32) -> Vec<DetectedObject> {
    let colours = colour_map(image);
    let mut seen = vec![false; PIXELS];
    let mut objects = Vec::new();
    let mut stack = Vec::new();
    let mut members = Vec::new();
    for start in 0..PIXELS {
        let Some(colour) = colours[start] else { continue };
        if seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        members.clear();
        while let Some(i) = stack.pop() {
            members.push(i);
            let (x, y) = (i % IMAGE_SIZE, i / IMAGE_SIZE);
            let neighbours = [
                (x > 0).then(|| i - 1),
                (x + 1 < IMAGE_SIZE).then(|| i + 1),
                (y > 0).then(|| i - IMAGE_SIZE),
                (y + 1 < IMAGE_SIZE).then(|| i + IMAGE_SIZE),
            ];
            for j in neighbours.into_iter().flatten() {
                if !seen[j] && colours[j] == Some(colour) {
                    seen[j] = true;
                    stack.push(j);
                }
            }
        }
        if members.len() >= MIN_OBJECT_AREA {
            objects.push(describe(colour, &members));
        }
    }
    objects
}

fn describe(colour: Colour, members: &[usize]) -> DetectedObject {
    let mut bbox = BoundingBox { x0: IMAGE_SIZE, y0: IMAGE_SIZE, x1: 0, y1: 0 };
    let (mut sx, mut sy) = (0.0f32, 0.0f32);
    for &i in members {
        let (x, y) = (i % IMAGE_SIZE, i / IMAGE_SIZE);
        bbox.x0 = bbox.x0.min(x);
        bbox.y0 = bbox.y0.min(y);
        bbox.x1 = bbox.x1.max(x + 1);
        bbox.y1 = bbox.y1.max(y + 1);
        sx += x as f32 + 0.5;
        sy += y as f32 + 0.5;
    }
    let (w, h) = (bbox.width(), bbox.height());
    let mut mask = vec![false; w * h];
    for &i in members {
        mask[(i / IMAGE_SIZE - bbox.y0) * w + (i % IMAGE_SIZE - bbox.x0)] = true;
    }
    let fits = shape_fits(&mask, w, h);
    let (shape, shape_fit) = classify_fits(fits, w, h);
    let n = members.len() as f32;
    DetectedObject { colour, shape, shape_fit, fits, area: members.len(), bbox, centroid: (sx / n, sy / n) }
}

impl DetectedObject {
    /// Intersection over union of the component with `shape`'s mask in its box.
    pub fn fit(&self, shape: Shape) -> f32 {
        let index = Shape::ALL.iter().position(|s| *s == shape).expect("every shape is in Shape::ALL");
        self.fits[index]
    }
}

/// Intersection over union of `mask` (row-major, `width` x `height`) with the rasterisation of
/// each shape of [`Shape::ALL`] into the same box.
pub fn shape_fits(mask: &[bool], width: usize, height: usize) -> [f32; 4] {
    Shape::ALL.map(|shape| {
        let ideal = shape.mask(width, height);
        let inter = ideal.iter().zip(mask).filter(|(a, b)| **a && **b).count();
        let union = ideal.iter().zip(mask).filter(|(a, b)| **a || **b).count();
        inter as f32 / union.max(1) as f32
    })
}

/// The shape whose rasterisation into a `width` x `height` box best overlaps `mask`
/// (row-major), with its intersection over union; `None` when the fit is below
/// [`MIN_SHAPE_FIT`] or the box is too thin or too elongated.
pub fn classify_shape(mask: &[bool], width: usize, height: usize) -> (Option<Shape>, f32) {
    classify_fits(shape_fits(mask, width, height), width, height)
}

fn classify_fits(fits: [f32; 4], width: usize, height: usize) -> (Option<Shape>, f32) {
    let (best, fit) = Shape::ALL
        .into_iter()
        .zip(fits)
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .expect("there are shapes");
    let (short, long) = (width.min(height), width.max(height));
    let well_formed = short >= MIN_SHAPE_SIDE && long as f32 <= MAX_ASPECT * short as f32;
    ((fit >= MIN_SHAPE_FIT && well_formed).then_some(best), fit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::render::{Background, PlacedObject, Scene};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn every_shape_colour_and_size_is_detected_exactly() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for shape in Shape::ALL {
            for colour in Colour::ALL {
                for size in 6..=16 {
                    // 6 is the fixed-grid fallback size; sampled layouts use 8 and up
                    let background = crate::world::render::varied_background(&mut rng);
                    let object = PlacedObject { shape, colour, x: 5, y: 7, size };
                    let img = Scene { background, objects: vec![object], text: None }.draw();
                    let found = detect_objects(&img);
                    assert_eq!(found.len(), 1, "{shape:?} {colour:?} {size}: {found:?}");
                    let d = found[0];
                    assert_eq!((d.shape, d.colour), (Some(shape), colour), "size {size}, fit {}", d.shape_fit);
                    assert_eq!(d.shape_fit, 1.0);
                    assert_eq!(d.bbox, BoundingBox { x0: 5, y0: 7, x1: 5 + size, y1: 7 + size });
                    let (cx, cy) = object.centre();
                    // a triangle's mass sits low in its box; the other shapes are symmetric
                    let tolerance = if shape == Shape::Triangle { 0.2 * size as f32 } else { 0.01 };
                    assert!((d.centroid.0 - cx).abs() <= 0.01, "{shape:?} {size}: {d:?}");
                    assert!((d.centroid.1 - cy).abs() <= tolerance, "{shape:?} {size}: {d:?}");
                }
            }
        }
    }

    #[test]
    fn separate_objects_are_separate_components() {
        let objects = vec![
            PlacedObject { shape: Shape::Square, colour: Colour::Red, x: 2, y: 2, size: 8 },
            PlacedObject { shape: Shape::Square, colour: Colour::Red, x: 12, y: 2, size: 8 },
            PlacedObject { shape: Shape::Cross, colour: Colour::Green, x: 2, y: 14, size: 10 },
        ];
        let img = Scene { background: Background::Solid([0.5; 3]), objects, text: None }.draw();
        let found = detect_objects(&img);
        assert_eq!(found.len(), 3);
        assert_eq!(found.iter().filter(|d| d.shape == Some(Shape::Square)).count(), 2);
        assert_eq!(found[2].bbox, BoundingBox { x0: 2, y0: 14, x1: 12, y1: 24 });
    }

    #[test]
    fn specks_lines_and_blank_images_are_not_objects() {
        let mut img = Image32::filled([0.5; 3]);
        assert!(detect_objects(&img).is_empty());
        for x in 0..5 {
            img.set(x, 0, Colour::Red.rgb()); // 5-pixel speck
        }
        for x in 0..12 {
            img.set(x, 10, Colour::Blue.rgb()); // a line: area 12, no shape
        }
        let found = detect_objects(&img);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].colour, Colour::Blue);
        assert_eq!(found[0].shape, None);
    }
}
