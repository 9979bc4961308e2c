//! 32 x 32 RGB images with `f32` channels in `[0, 1]`: the pixels of the synthetic world.
//!
//! [`Image32`] stores pixels row-major with channels last (HWC). The model side uses CHW
//! ([`Image32::to_chw`], [`Image32::from_chw`]); rewards and files use 8-bit
//! [`image::RgbImage`] ([`Image32::to_rgb_image`], [`Image32::from_rgb_image`], PNG).

use std::path::{Path, PathBuf};

use image::RgbImage;
use thiserror::Error;

/// Side length of every world image, in pixels.
pub const IMAGE_SIZE: usize = 32;
/// Colour channels per pixel (R, G, B).
pub const CHANNELS: usize = 3;
/// Number of pixels in a world image.
pub const PIXELS: usize = IMAGE_SIZE * IMAGE_SIZE;

/// An RGB colour with channels in `[0, 1]`.
pub type Rgb = [f32; 3];

/// Errors converting, reading or writing [`Image32`]s.
#[derive(Debug, Error)]
pub enum ImageError {
    /// An 8-bit image does not have the world's size.
    #[error("image is {width}x{height} pixels, the synthetic world uses {IMAGE_SIZE}x{IMAGE_SIZE}")]
    Size {
        /// Width of the offending image.
        width: u32,
        /// Height of the offending image.
        height: u32,
    },
    /// A flat buffer has the wrong number of values for its layout.
    #[error("{layout} buffer holds {len} values, a {IMAGE_SIZE}x{IMAGE_SIZE} RGB image needs {}", PIXELS * CHANNELS)]
    BufferLength {
        /// `"HWC"` or `"CHW"`.
        layout: &'static str,
        /// Number of values received.
        len: usize,
    },
    /// Writing a PNG failed.
    #[error("cannot write PNG {path}: {source}")]
    WritePng {
        /// Destination file.
        path: PathBuf,
        /// Underlying encoder or I/O error.
        source: Box<image::ImageError>,
    },
    /// Reading a PNG failed.
    #[error("cannot read PNG {path}: {source}")]
    ReadPng {
        /// Source file.
        path: PathBuf,
        /// Underlying decoder or I/O error.
        source: Box<image::ImageError>,
    },
}

/// A 32 x 32 RGB image, channels in `[0, 1]`, stored row-major (HWC).
#[derive(Clone, Debug, PartialEq)]
pub struct Image32 {
    pixels: Vec<Rgb>,
}

impl Image32 {
    /// An image of one colour.
    pub fn filled(colour: Rgb) -> Self {
        Self { pixels: vec![colour; PIXELS] }
    }

    /// An image whose pixel `(x, y)` is `f(x, y)`.
    pub fn from_fn(mut f: impl FnMut(usize, usize) -> Rgb) -> Self {
        let pixels = (0..PIXELS).map(|i| f(i % IMAGE_SIZE, i / IMAGE_SIZE)).collect();
        Self { pixels }
    }

    /// The pixel at column `x`, row `y`. Panics outside the image.
    pub fn get(&self, x: usize, y: usize) -> Rgb {
        self.pixels[y * IMAGE_SIZE + x]
    }

    /// Sets the pixel at column `x`, row `y`. Panics outside the image.
    pub fn set(&mut self, x: usize, y: usize, colour: Rgb) {
        self.pixels[y * IMAGE_SIZE + x] = colour;
    }

    /// Alpha-composites `colour` over pixel `(x, y)`: `p = (1 - alpha) p + alpha c`.
    pub fn blend(&mut self, x: usize, y: usize, colour: Rgb, alpha: f32) {
        let p = &mut self.pixels[y * IMAGE_SIZE + x];
        for (dst, src) in p.iter_mut().zip(colour) {
            *dst += alpha * (src - *dst);
        }
    }

    /// All pixels, row-major.
    pub fn pixels(&self) -> &[Rgb] {
        &self.pixels
    }

    /// Mutable access to all pixels, row-major.
    pub fn pixels_mut(&mut self) -> &mut [Rgb] {
        &mut self.pixels
    }

    /// The channel values as one flat HWC slice (`[y][x][c]`, 3072 values).
    pub fn as_hwc(&self) -> &[f32] {
        self.pixels.as_flattened()
    }

    /// An image from a flat HWC buffer of 3072 values.
    pub fn from_hwc(values: &[f32]) -> Result<Self, ImageError> {
        if values.len() != PIXELS * CHANNELS {
            return Err(ImageError::BufferLength { layout: "HWC", len: values.len() });
        }
        let pixels = values.chunks_exact(CHANNELS).map(|c| [c[0], c[1], c[2]]).collect();
        Ok(Self { pixels })
    }

    /// The channel values as a flat CHW buffer (`[c][y][x]`), the layout of a tensor
    /// `[3, 32, 32]`.
    pub fn to_chw(&self) -> Vec<f32> {
        (0..CHANNELS).flat_map(|c| self.pixels.iter().map(move |p| p[c])).collect()
    }

    /// An image from a flat CHW buffer of 3072 values.
    pub fn from_chw(values: &[f32]) -> Result<Self, ImageError> {
        if values.len() != PIXELS * CHANNELS {
            return Err(ImageError::BufferLength { layout: "CHW", len: values.len() });
        }
        let pixels = (0..PIXELS).map(|i| [values[i], values[PIXELS + i], values[2 * PIXELS + i]]).collect();
        Ok(Self { pixels })
    }

    /// Clamps every channel into `[0, 1]` (a model's output may leave the range).
    pub fn clamped(mut self) -> Self {
        for p in &mut self.pixels {
            for v in p.iter_mut() {
                *v = v.clamp(0.0, 1.0);
            }
        }
        self
    }

    /// Rec. 601 luminance `0.299 R + 0.587 G + 0.114 B` of every pixel, row-major.
    pub fn luminance(&self) -> Vec<f32> {
        self.pixels.iter().map(|p| luminance(*p)).collect()
    }

    /// The 8-bit image (channels clamped to `[0, 1]`, scaled by 255 and rounded).
    pub fn to_rgb_image(&self) -> RgbImage {
        let bytes = self.as_hwc().iter().map(|&v| to_byte(v)).collect();
        RgbImage::from_raw(IMAGE_SIZE as u32, IMAGE_SIZE as u32, bytes).expect("32x32x3 bytes fill a 32x32 RgbImage")
    }

    /// An image from an 8-bit 32 x 32 image (`v / 255`).
    pub fn from_rgb_image(image: &RgbImage) -> Result<Self, ImageError> {
        let (width, height) = image.dimensions();
        if width as usize != IMAGE_SIZE || height as usize != IMAGE_SIZE {
            return Err(ImageError::Size { width, height });
        }
        let values: Vec<f32> = image.as_raw().iter().map(|&b| f32::from(b) / 255.0).collect();
        Self::from_hwc(&values)
    }

    /// Writes the image as an 8-bit PNG.
    pub fn save_png(&self, path: impl AsRef<Path>) -> Result<(), ImageError> {
        let path = path.as_ref();
        self.to_rgb_image()
            .save_with_format(path, image::ImageFormat::Png)
            .map_err(|source| ImageError::WritePng { path: path.to_owned(), source: Box::new(source) })
    }

    /// Reads a 32 x 32 PNG (any colour type; converted to RGB).
    pub fn load_png(path: impl AsRef<Path>) -> Result<Self, ImageError> {
        let path = path.as_ref();
        let decoded = image::open(path)
            .map_err(|source| ImageError::ReadPng { path: path.to_owned(), source: Box::new(source) })?;
        Self::from_rgb_image(&decoded.to_rgb8())
    }
}

/// Rec. 601 luminance of one colour.
pub fn luminance(c: Rgb) -> f32 {
    0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
}

/// Euclidean distance between two colours in RGB.
pub fn colour_distance(a: Rgb, b: Rgb) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

fn to_byte(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// Tiles images into one 8-bit picture: `columns` per row, each enlarged `scale` times by
/// nearest neighbour, separated by 1-pixel grey lines. For sample grids and quick looks.
pub fn image_grid(images: &[Image32], columns: usize, scale: u32) -> RgbImage {
    let rgb: Vec<RgbImage> = images.iter().map(Image32::to_rgb_image).collect();
    rgb_grid(&rgb, columns, IMAGE_SIZE as u32 * scale.max(1))
}

/// Tiles 8-bit images of any size into one picture: `columns` per row, each resized to `cell`
/// pixels a side (nearest neighbour when enlarging, so pixels stay sharp; a triangle filter
/// when shrinking), separated by 1-pixel grey lines.
pub fn rgb_grid(images: &[RgbImage], columns: usize, cell: u32) -> RgbImage {
    use image::imageops::{FilterType, overlay, resize};
    let columns = columns.max(1);
    let rows = images.len().div_ceil(columns).max(1);
    let width = columns as u32 * (cell + 1) + 1;
    let height = rows as u32 * (cell + 1) + 1;
    let mut grid = RgbImage::from_pixel(width, height, image::Rgb([128, 128, 128]));
    for (i, img) in images.iter().enumerate() {
        let (ox, oy) = ((i % columns) as u32 * (cell + 1) + 1, (i / columns) as u32 * (cell + 1) + 1);
        let filter = if img.width() <= cell && img.height() <= cell { FilterType::Nearest } else { FilterType::Triangle };
        overlay(&mut grid, &resize(img, cell, cell, filter), ox as i64, oy as i64);
    }
    grid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp() -> Image32 {
        Image32::from_fn(|x, y| [x as f32 / 31.0, y as f32 / 31.0, ((x + y) % 7) as f32 / 6.0])
    }

    #[test]
    fn chw_and_hwc_round_trip_and_agree_on_indexing() {
        let img = ramp();
        let chw = img.to_chw();
        // channel 1 (green) of pixel x = 3, y = 5
        assert_eq!(chw[PIXELS + 5 * IMAGE_SIZE + 3], img.get(3, 5)[1]);
        assert_eq!(img.as_hwc()[(5 * IMAGE_SIZE + 3) * 3 + 1], img.get(3, 5)[1]);
        assert_eq!(Image32::from_chw(&chw).unwrap(), img);
        assert_eq!(Image32::from_hwc(img.as_hwc()).unwrap(), img);
    }

    #[test]
    fn wrong_buffer_lengths_and_sizes_are_named() {
        let err = Image32::from_chw(&[0.0; 10]).unwrap_err();
        assert!(err.to_string().contains("CHW buffer holds 10 values"), "{err}");
        let err = Image32::from_rgb_image(&RgbImage::new(64, 32)).unwrap_err();
        assert!(err.to_string().contains("64x32"), "{err}");
    }

    #[test]
    fn png_round_trip_is_exact_to_8_bits() {
        let img = ramp();
        let dir = std::env::temp_dir().join(format!("flow_opd_world_png_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ramp.png");
        img.save_png(&path).unwrap();
        let back = Image32::load_png(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        for (a, b) in img.as_hwc().iter().zip(back.as_hwc()) {
            assert!((a - b).abs() <= 0.5 / 255.0 + 1e-6, "{a} vs {b}");
        }
        assert_eq!(back.to_rgb_image(), img.to_rgb_image());
    }

    #[test]
    fn missing_png_names_the_path() {
        let err = Image32::load_png("/nonexistent/flow_opd.png").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/flow_opd.png"), "{err}");
    }

    #[test]
    fn blend_interpolates_and_grid_has_expected_size() {
        let mut img = Image32::filled([0.0, 0.0, 0.0]);
        img.blend(1, 1, [1.0, 0.5, 0.0], 0.5);
        assert_eq!(img.get(1, 1), [0.5, 0.25, 0.0]);
        let grid = image_grid(&[img.clone(), img.clone(), img], 2, 2);
        assert_eq!(grid.dimensions(), (2 * 65 + 1, 2 * 65 + 1));
    }
}
