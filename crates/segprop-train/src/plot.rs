//! Stage-concatenated loss curves as a self-contained SVG (the papers' Fig. 2 style): the x axis
//! is the global optimizer step, stage boundaries are dashed lines.

/// One curve.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Draw markers instead of a line (eval points).
    pub markers: bool,
}

const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Renders `series` with vertical markers at `boundaries` (x, label).
pub fn loss_curves_svg(title: &str, series: &[Series], boundaries: &[(f64, String)]) -> String {
    let (w, h) = (900.0, 480.0);
    let (left, right, top, bottom) = (70.0, 20.0, 40.0, 50.0);
    let all = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|p| p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    y0 -= pad;
    y1 += pad;
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let sy = |y: f64| top + (1.0 - (y - y0) / (y1 - y0)) * (h - top - bottom);

    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        w / 2.0,
        escape(title)
    );
    // Axes and ticks.
    svg.push_str(&format!(
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - bottom, w - right, h - bottom, h - bottom
    ));
    for i in 0..=5 {
        let y = y0 + (y1 - y0) * i as f64 / 5.0;
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{:.3}</text>\n<line x1=\"{left}\" y1=\"{:.1}\" x2=\"{}\" y2=\"{:.1}\" stroke=\"#eee\"/>\n",
            left - 6.0, sy(y) + 4.0, y, sy(y), w - right, sy(y)
        ));
        let x = x0 + (x1 - x0) * i as f64 / 5.0;
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{:.0}</text>\n",
            sx(x),
            h - bottom + 16.0,
            x
        ));
    }
    svg.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">global step</text>\n<text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">loss</text>\n",
        w / 2.0, h - 12.0, h / 2.0, h / 2.0
    ));
    for (x, label) in boundaries {
        svg.push_str(&format!(
            "<line x1=\"{0:.1}\" y1=\"{top}\" x2=\"{0:.1}\" y2=\"{1}\" stroke=\"#999\" stroke-dasharray=\"4 3\"/>\n\
             <text x=\"{2:.1}\" y=\"{3}\" font-size=\"10\" fill=\"#666\">{4}</text>\n",
            sx(*x),
            h - bottom,
            sx(*x) + 3.0,
            top + 10.0,
            escape(label)
        ));
    }
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<_> = s.points.iter().filter(|p| p.1.is_finite()).collect();
        if s.markers {
            for (x, y) in &pts {
                svg.push_str(&format!(
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>\n",
                    sx(*x),
                    sy(*y)
                ));
            }
        } else if !pts.is_empty() {
            let path: Vec<String> = pts
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
                .collect();
            svg.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
                path.join(" ")
            ));
        }
        let ly = top + 20.0 + 16.0 * i as f64;
        svg.push_str(&format!(
            "<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"3\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\">{}</text>\n",
            w - right - 200.0,
            ly - 4.0,
            w - right - 182.0,
            ly,
            escape(&s.label)
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_series_and_boundaries() {
        let svg = loss_curves_svg(
            "t <1>",
            &[Series {
                label: "train".into(),
                points: vec![(1.0, 5.0), (2.0, 4.0), (3.0, f64::NAN)],
                markers: false,
            }],
            &[(2.0, "segment-2-3".into())],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(
            svg.contains("polyline") && svg.contains("segment-2-3") && svg.contains("t &lt;1&gt;")
        );
    }
}
