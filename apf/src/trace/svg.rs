//! A latency distribution chart as a standalone SVG: latency (log scale)
//! against percentile (on a "nines" scale, so the tail is visible), one
//! series per span name.

use std::fmt::Write as _;
use std::time::Duration;

const W: f64 = 800.0;
const H: f64 = 480.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
/// The x axis ends at 99.999%.
const MAX_NINES: f64 = 5.0;
const COLORS: [&str; 7] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf"];

fn nines(q: f64) -> f64 {
    (-(1.0 - q.min(1.0 - 1e-12)).log10()).clamp(0.0, MAX_NINES)
}

/// An SVG chart of `curves` (from [`super::LatencyLayer::curves`]): one
/// `<polyline class="series">` per span name, with a legend.
pub fn latency_plot(title: &str, curves: &[(&str, Vec<(f64, Duration)>)]) -> String {
    let all = curves.iter().flat_map(|(_, pts)| pts.iter().map(|p| p.1.as_nanos().max(1) as f64));
    let (lo, hi) = all.fold((f64::MAX, 1.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let lo_dec = if lo == f64::MAX { 0.0 } else { lo.log10().floor() };
    let hi_dec = hi.log10().ceil().max(lo_dec + 1.0);
    let x = |q: f64| LEFT + nines(q) / MAX_NINES * (W - LEFT - RIGHT);
    let y = |ns: f64| TOP + (hi_dec - ns.max(1.0).log10()) / (hi_dec - lo_dec) * (H - TOP - BOTTOM);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(s, "<rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>");
    let _ = writeln!(s, "<text x=\"{}\" y=\"24\" font-size=\"15\">{}</text>", LEFT, xml_escape(title));
    // Axes and grid.
    let (x0, x1, y0, y1) = (LEFT, W - RIGHT, TOP, H - BOTTOM);
    let _ = writeln!(s, "<path d=\"M{x0} {y0} L{x0} {y1} L{x1} {y1}\" stroke=\"black\" fill=\"none\"/>");
    for (q, label) in
        [(0.0, "0%"), (0.9, "90%"), (0.99, "99%"), (0.999, "99.9%"), (0.9999, "99.99%"), (0.99999, "99.999%")]
    {
        let gx = x(q);
        let _ = writeln!(s, "<line x1=\"{gx:.1}\" y1=\"{y0}\" x2=\"{gx:.1}\" y2=\"{y1}\" stroke=\"#ddd\"/>");
        let _ = writeln!(s, "<text x=\"{gx:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>", y1 + 18.0);
    }
    let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">percentile</text>", (x0 + x1) / 2.0, H - 15.0);
    let mut dec = lo_dec;
    while dec <= hi_dec {
        let gy = y(10f64.powf(dec));
        let _ = writeln!(s, "<line x1=\"{x0}\" y1=\"{gy:.1}\" x2=\"{x1}\" y2=\"{gy:.1}\" stroke=\"#ddd\"/>");
        let _ = writeln!(s, "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>", x0 - 6.0, gy + 4.0, unit(dec));
        dec += 1.0;
    }
    let _ = writeln!(
        s,
        "<text x=\"18\" y=\"{:.1}\" transform=\"rotate(-90 18 {:.1})\" text-anchor=\"middle\">latency (log scale)</text>",
        (y0 + y1) / 2.0,
        (y0 + y1) / 2.0
    );
    // Series and legend.
    for (i, (name, pts)) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<String> =
            pts.iter().map(|(q, d)| format!("{:.1},{:.1}", x(*q), y(d.as_nanos().max(1) as f64))).collect();
        let _ = writeln!(
            s,
            "<polyline class=\"series\" data-span=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            xml_escape(name),
            points.join(" ")
        );
        let ly = TOP + 10.0 + i as f64 * 20.0;
        let _ = writeln!(
            s,
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"3\"/>",
            x1 + 15.0,
            x1 + 40.0
        );
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\">{}</text>", x1 + 46.0, ly + 4.0, xml_escape(name));
    }
    s.push_str("</svg>\n");
    s
}

fn unit(decade: f64) -> &'static str {
    match decade as i64 {
        0 => "1 ns",
        1 => "10 ns",
        2 => "100 ns",
        3 => "1 µs",
        4 => "10 µs",
        5 => "100 µs",
        6 => "1 ms",
        7 => "10 ms",
        8 => "100 ms",
        9 => "1 s",
        10 => "10 s",
        11 => "100 s",
        _ => "",
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_series_per_curve_and_balanced_tags() {
        let us = Duration::from_micros;
        let curves =
            vec![("apf.fault", vec![(0.5, us(20)), (0.99, us(80))]), ("apf.fill", vec![(0.5, us(2)), (0.999, us(9))])];
        let svg = latency_plot("a <title>", &curves);
        assert_eq!(svg.matches("<polyline class=\"series\"").count(), 2);
        assert!(svg.contains("data-span=\"apf.fill\""));
        assert!(svg.contains("a &lt;title&gt;"));
        assert_eq!(svg.matches("<svg").count(), 1);
        assert!(svg.trim_end().ends_with("</svg>"));
        let empty = latency_plot("nothing", &[]);
        assert!(empty.contains("</svg>") && !empty.contains("polyline"));
    }
}
