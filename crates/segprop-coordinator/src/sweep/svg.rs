//! Self-contained SVG charts for sweep reports: lines with optional markers, and labelled
//! scatter points whose radius carries a third quantity (the frontier plot).

/// One line of a chart.
pub struct Line {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// One point of a scatter chart; `size` in `0..=1` scales its radius.
pub struct Dot {
    pub label: String,
    pub x: f64,
    pub y: f64,
    pub size: f64,
    /// Which colour (regimes share one).
    pub group: usize,
}

const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];
const W: f64 = 900.0;
const H: f64 = 500.0;
const LEFT: f64 = 75.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

struct Frame {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Frame {
    fn of(points: impl Iterator<Item = (f64, f64)>) -> Self {
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for (x, y) in points.filter(|(x, y)| x.is_finite() && y.is_finite()) {
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
        let pad = ((y1 - y0) * 0.06).max(1e-3);
        Self {
            x0,
            x1,
            y0: y0 - pad,
            y1: y1 + pad,
        }
    }
    fn sx(&self, x: f64) -> f64 {
        LEFT + (x - self.x0) / (self.x1 - self.x0) * (W - LEFT - RIGHT)
    }
    fn sy(&self, y: f64) -> f64 {
        TOP + (1.0 - (y - self.y0) / (self.y1 - self.y0)) * (H - TOP - BOTTOM)
    }

    fn axes(&self, title: &str, x_label: &str, y_label: &str) -> String {
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" \
             font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n\
             <line x1=\"{LEFT}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\n\
             <line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{b}\" stroke=\"black\"/>\n",
            (W - RIGHT + LEFT) / 2.0,
            escape(title),
            b = H - BOTTOM,
            r = W - RIGHT,
        );
        for i in 0..=5 {
            let y = self.y0 + (self.y1 - self.y0) * f64::from(i) / 5.0;
            let x = self.x0 + (self.x1 - self.x0) * f64::from(i) / 5.0;
            svg.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n\
                 <line x1=\"{LEFT}\" y1=\"{:.1}\" x2=\"{}\" y2=\"{:.1}\" stroke=\"#eee\"/>\n\
                 <text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
                LEFT - 6.0,
                self.sy(y) + 4.0,
                tick(y),
                self.sy(y),
                W - RIGHT,
                self.sy(y),
                self.sx(x),
                H - BOTTOM + 16.0,
                tick(x),
            ));
        }
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n\
             <text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">{}</text>\n",
            (W - RIGHT + LEFT) / 2.0,
            H - 12.0,
            escape(x_label),
            H / 2.0,
            H / 2.0,
            escape(y_label)
        ));
        svg
    }
}

fn tick(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn legend(svg: &mut String, index: usize, label: &str) {
    let y = TOP + 8.0 + 18.0 * index as f64;
    let x = W - RIGHT + 12.0;
    svg.push_str(&format!(
        "<rect x=\"{x}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{}\"/>\
         <text x=\"{}\" y=\"{:.1}\">{}</text>\n",
        y - 10.0,
        COLORS[index % COLORS.len()],
        x + 18.0,
        y,
        escape(label)
    ));
}

/// Lines (with a marker at every point), with dashed vertical marks at `marks` (x, label).
pub fn lines(
    title: &str,
    x_label: &str,
    y_label: &str,
    lines: &[Line],
    marks: &[(f64, String)],
) -> String {
    let frame = Frame::of(lines.iter().flat_map(|l| l.points.iter().copied()));
    let mut svg = frame.axes(title, x_label, y_label);
    for (x, label) in marks {
        let sx = frame.sx(*x);
        svg.push_str(&format!(
            "<line x1=\"{sx:.1}\" y1=\"{TOP}\" x2=\"{sx:.1}\" y2=\"{}\" stroke=\"#999\" stroke-dasharray=\"4 3\"/>\
             <text x=\"{:.1}\" y=\"{}\" font-size=\"9\" fill=\"#666\">{}</text>\n",
            H - BOTTOM,
            sx + 2.0,
            TOP + 10.0,
            escape(label),
        ));
    }
    for (i, line) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = line
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", frame.sx(x), frame.sy(y)))
            .collect();
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.6\" points=\"{}\"/>\n",
            path.join(" ")
        ));
        for p in &path {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            svg.push_str(&format!(
                "<circle cx=\"{x}\" cy=\"{y}\" r=\"2.2\" fill=\"{color}\"/>\n"
            ));
        }
        legend(&mut svg, i, &line.label);
    }
    svg.push_str("</svg>\n");
    svg
}

/// Labelled points; `groups` names the colours in the legend.
pub fn scatter(
    title: &str,
    x_label: &str,
    y_label: &str,
    dots: &[Dot],
    groups: &[String],
) -> String {
    let frame = Frame::of(dots.iter().map(|d| (d.x, d.y)));
    let mut svg = frame.axes(title, x_label, y_label);
    for d in dots.iter().filter(|d| d.x.is_finite() && d.y.is_finite()) {
        let color = COLORS[d.group % COLORS.len()];
        let r = 4.0 + 14.0 * d.size.clamp(0.0, 1.0);
        svg.push_str(&format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"{r:.1}\" fill=\"{color}\" fill-opacity=\"0.45\" stroke=\"{color}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\">{}</text>\n",
            frame.sx(d.x),
            frame.sy(d.y),
            frame.sx(d.x) + r + 2.0,
            frame.sy(d.y) + 3.0,
            escape(&d.label)
        ));
    }
    for (i, g) in groups.iter().enumerate() {
        legend(&mut svg, i, g);
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_and_skip_non_finite_points() {
        let svg = lines(
            "t <1>",
            "step",
            "loss",
            &[Line {
                label: "a&b".into(),
                points: vec![(0.0, 2.0), (1.0, f64::NAN), (2.0, 1.0)],
            }],
            &[(1.0, "stage".into())],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &lt;1&gt;") && svg.contains("a&amp;b"));
        assert_eq!(svg.matches("<circle").count(), 2);
        let svg = scatter(
            "f",
            "s",
            "acc",
            &[Dot {
                label: "r2 k1".into(),
                x: 1.0,
                y: 0.5,
                size: 0.5,
                group: 0,
            }],
            &["segprop".into()],
        );
        assert!(svg.contains("r2 k1") && svg.contains("segprop"));
    }
}
