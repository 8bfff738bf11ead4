// Command truth answers imagevol's differential cases with the runtimes' own Go code.
//
// It reads a JSON document of cases on stdin and writes the answers as JSON on stdout:
//   - references: distribution/reference v0.6.0 ParseNormalizedNamed, String, FamiliarString,
//     ParseDockerRef (what containerd 2.1 and CRI-O 1.34 do with an image reference);
//   - platform parse / normalize / Only(host).Match / OnlyStrict(host).Match / Only(host).Less:
//     containerd/platforms v1.0.0-rc.2, the version containerd 2.1 vendors;
//   - layouts: which manifest containerd 2.1 (core/images Manifest) and containers/image v5.36
//     (OCI index / Docker list instance choice, as CRI-O 1.34 calls it) take for a node. Those two
//     selection loops are written here after reading the runtimes' sources (their packages pull in
//     too much to build offline); the platform matching inside them is the real rc.2 code, the JSON
//     decoding is Go's encoding/json.
//
// This is imagevol's own program; it only links the libraries named above.
package main

import (
	"crypto/sha256"
	_ "crypto/sha512" // the runtimes link it: sha384 / sha512 digests are "available"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"sort"

	"github.com/containerd/platforms"
	"github.com/distribution/reference"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

var _ = sha256.New

type platformCase struct {
	Host      ocispec.Platform  `json:"host"`
	Candidate ocispec.Platform  `json:"candidate"`
	Other     *ocispec.Platform `json:"other,omitempty"`
}

type layoutCase struct {
	Name  string             `json:"name"`
	Root  ocispec.Descriptor `json:"root"`
	Blobs map[string][]byte  `json:"blobs"` // digest -> content (base64 in JSON)
	Nodes []ocispec.Platform `json:"nodes"`
}

type cases struct {
	References []string           `json:"references"`
	Parse      []string           `json:"platformParse"`
	Normalize  []ocispec.Platform `json:"platformNormalize"`
	Match      []platformCase     `json:"platformMatch"`
	Layouts    []layoutCase       `json:"layouts"`
	Blobs      map[string][]byte  `json:"blobs"` // digest -> content (base64 in JSON), for every layout
}

type refAnswer struct {
	Input     string  `json:"input"`
	Error     *string `json:"error"`
	String    string  `json:"string"`
	Familiar  string  `json:"familiar"`
	DockerRef string  `json:"dockerRef"`
	Domain    string  `json:"domain"`
	Path      string  `json:"path"`
	Tag       string  `json:"tag"`
	Digest    string  `json:"digest"`
}

type parseAnswer struct {
	Input    string            `json:"input"`
	Error    *string           `json:"error"`
	Platform *ocispec.Platform `json:"platform"`
}

type normalizeAnswer struct {
	Input  ocispec.Platform `json:"input"`
	Output ocispec.Platform `json:"output"`
}

type matchAnswer struct {
	platformCase
	Only       bool  `json:"only"`
	OnlyStrict bool  `json:"onlyStrict"`
	Less       *bool `json:"less,omitempty"`
	Greater    *bool `json:"greater,omitempty"`
}

type selection struct {
	Digest string `json:"digest,omitempty"`
	Error  string `json:"error,omitempty"`
	// CRI-O only: the chosen entry is itself an index (c/image cannot copy it as one image).
	Nested bool `json:"nested,omitempty"`
}

type nodeAnswer struct {
	Node       ocispec.Platform `json:"node"`
	Containerd selection        `json:"containerd"`
	Crio       selection        `json:"crio"`
}

type layoutAnswer struct {
	Name  string       `json:"name"`
	Nodes []nodeAnswer `json:"nodes"`
}

type answers struct {
	Generator  string            `json:"generator"`
	References []refAnswer       `json:"references"`
	Parse      []parseAnswer     `json:"platformParse"`
	Normalize  []normalizeAnswer `json:"platformNormalize"`
	Match      []matchAnswer     `json:"platformMatch"`
	Layouts    []layoutAnswer    `json:"layouts"`
}

func ref(s string) refAnswer {
	a := refAnswer{Input: s}
	named, err := reference.ParseNormalizedNamed(s)
	if err != nil {
		e := err.Error()
		a.Error = &e
		return a
	}
	a.String = named.String()
	a.Familiar = reference.FamiliarString(named)
	a.Domain = reference.Domain(named)
	a.Path = reference.Path(named)
	if t, ok := named.(reference.Tagged); ok {
		a.Tag = t.Tag()
	}
	if d, ok := named.(reference.Digested); ok {
		a.Digest = d.Digest().String()
	}
	dr, err := reference.ParseDockerRef(s)
	if err != nil {
		a.DockerRef = "error: " + err.Error()
	} else {
		a.DockerRef = dr.String()
	}
	return a
}

// --- containerd 2.1 core/images Manifest() -----------------------------------------------
var errNotFound = errors.New("not found")

func isManifestType(mt string) bool {
	return mt == ocispec.MediaTypeImageManifest || mt == "application/vnd.docker.distribution.manifest.v2+json"
}

func isIndexType(mt string) bool {
	return mt == ocispec.MediaTypeImageIndex || mt == "application/vnd.docker.distribution.manifest.list.v2+json"
}

type blobs map[string][]byte

func (b blobs) read(d ocispec.Descriptor) ([]byte, error) {
	p, ok := b[d.Digest.String()]
	if !ok {
		return nil, fmt.Errorf("content digest %s: %w", d.Digest, errNotFound)
	}
	return p, nil
}

func containerdManifest(b blobs, image ocispec.Descriptor, platform platforms.MatchComparer) (string, error) {
	var chosen []string
	wasIndex := false
	var walk func(descs []ocispec.Descriptor) error
	walk = func(descs []ocispec.Descriptor) error {
		for _, desc := range descs {
			var children []ocispec.Descriptor
			switch {
			case isManifestType(desc.MediaType):
				p, err := b.read(desc)
				if err != nil {
					return err
				}
				var manifest ocispec.Manifest
				if err := json.Unmarshal(p, &manifest); err != nil {
					return err
				}
				if desc.Digest != image.Digest {
					if desc.Platform != nil && !platform.Match(*desc.Platform) {
						continue
					}
					if desc.Platform == nil {
						c, err := b.read(manifest.Config)
						if err != nil {
							return err
						}
						var imagePlatform ocispec.Platform
						if err := json.Unmarshal(c, &imagePlatform); err != nil {
							return err
						}
						if !platform.Match(platforms.Normalize(imagePlatform)) {
							continue
						}
					}
				}
				chosen = append(chosen, desc.Digest.String())
			case isIndexType(desc.MediaType):
				p, err := b.read(desc)
				if err != nil {
					return err
				}
				var idx ocispec.Index
				if err := json.Unmarshal(p, &idx); err != nil {
					return err
				}
				var descs []ocispec.Descriptor
				for _, d := range idx.Manifests {
					if d.Platform == nil || platform.Match(*d.Platform) {
						descs = append(descs, d)
					}
				}
				sort.SliceStable(descs, func(i, j int) bool {
					if descs[i].Platform == nil {
						return false
					}
					if descs[j].Platform == nil {
						return true
					}
					return platform.Less(*descs[i].Platform, *descs[j].Platform)
				})
				wasIndex = true
				if len(descs) > 1 {
					descs = descs[:1]
				}
				children = descs
			default:
				return fmt.Errorf("unexpected media type %v for %v: %w", desc.MediaType, desc.Digest, errNotFound)
			}
			if len(children) > 0 {
				if err := walk(children); err != nil {
					return err
				}
			}
		}
		return nil
	}
	if err := walk([]ocispec.Descriptor{image}); err != nil {
		return "", err
	}
	if len(chosen) == 0 {
		if wasIndex {
			return "", fmt.Errorf("no match for platform in manifest %v: %w", image.Digest, errNotFound)
		}
		return "", fmt.Errorf("manifest %v: %w", image.Digest, errNotFound)
	}
	return chosen[0], nil
}

// --- containers/image v5.36 instance choice (CRI-O 1.34 never sets PreferGzipInstances) -----------
var compatibility = map[string][]string{"arm": {"v8", "v7", "v6", "v5"}, "arm64": {"v8"}}

func wantedPlatforms(os, arch, variant string) []ocispec.Platform {
	var variants []string
	if variant != "" {
		if order := compatibility[arch]; order != nil {
			for i, v := range order {
				if v == variant {
					variants = append(variants, order[i:]...)
					break
				}
			}
		}
		if variants == nil {
			variants = []string{variant}
		}
		variants = append(variants, "")
	} else {
		variants = append(variants, "")
		variants = append(variants, compatibility[arch]...)
	}
	out := []ocispec.Platform{}
	for _, v := range variants {
		out = append(out, ocispec.Platform{OS: os, Architecture: arch, Variant: v})
	}
	return out
}

// The variant containers/image's getCPUVariant reports on a node of this platform.
func crioNodeVariant(node ocispec.Platform) string {
	if node.OS == "darwin" || node.OS == "windows" {
		switch node.Architecture {
		case "arm64":
			return "v8"
		case "arm":
			return "v7"
		}
		return ""
	}
	switch node.Architecture {
	case "arm64":
		return "v8"
	case "arm":
		return node.Variant
	}
	return ""
}

func matchesPlatform(image, wanted ocispec.Platform) bool {
	return image.Architecture == wanted.Architecture && image.OS == wanted.OS && image.Variant == wanted.Variant
}

type candidate struct {
	platformIndex int
	isZstd        bool
	position      int
	desc          ocispec.Descriptor
}

func (c candidate) preferredOver(o candidate) bool {
	switch {
	case c.platformIndex != o.platformIndex:
		return c.platformIndex < o.platformIndex
	case c.isZstd != o.isZstd:
		return c.isZstd
	}
	return c.position < o.position
}

func crioChoose(b blobs, root ocispec.Descriptor, node ocispec.Platform) selection {
	if !isIndexType(root.MediaType) {
		return selection{Digest: root.Digest.String()}
	}
	p, err := b.read(root)
	if err != nil {
		return selection{Error: err.Error()}
	}
	var idx ocispec.Index
	if err := json.Unmarshal(p, &idx); err != nil {
		return selection{Error: err.Error()}
	}
	n := platforms.Normalize(node)
	wanted := wantedPlatforms(n.OS, n.Architecture, crioNodeVariant(n))
	var best *candidate
	if root.MediaType == "application/vnd.docker.distribution.manifest.list.v2+json" {
	outer:
		for _, w := range wanted {
			for i, d := range idx.Manifests {
				var ip ocispec.Platform
				if d.Platform != nil {
					ip = ocispec.Platform{OS: d.Platform.OS, Architecture: d.Platform.Architecture, Variant: d.Platform.Variant}
				}
				if matchesPlatform(ip, w) {
					best = &candidate{position: i, desc: d}
					break outer
				}
			}
		}
		if best == nil {
			return selection{Error: fmt.Sprintf("no image found in manifest list for architecture %q, variant %q, OS %q", wanted[0].Architecture, wanted[0].Variant, wanted[0].OS)}
		}
	} else {
		for i, d := range idx.Manifests {
			c := candidate{platformIndex: math.MaxInt, position: i, desc: d, isZstd: d.Annotations["io.github.containers.compression.zstd"] == "true"}
			if d.Platform != nil {
				c.platformIndex = -1
				for j, w := range wanted {
					if matchesPlatform(*d.Platform, w) {
						c.platformIndex = j
						break
					}
				}
				if c.platformIndex == -1 {
					continue
				}
			}
			if best == nil || c.preferredOver(*best) {
				cc := c
				best = &cc
			}
		}
		if best == nil {
			return selection{Error: fmt.Sprintf("no image found in image index for architecture %q, variant %q, OS %q", wanted[0].Architecture, wanted[0].Variant, wanted[0].OS)}
		}
	}
	return selection{Digest: best.desc.Digest.String(), Nested: isIndexType(best.desc.MediaType)}
}

func main() {
	var in cases
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, "truth: reading cases:", err)
		os.Exit(1)
	}
	out := answers{Generator: "scripts/truth (distribution/reference v0.6.0, containerd/platforms v1.0.0-rc.2, go-digest v1.0.0)"}
	for _, s := range in.References {
		out.References = append(out.References, ref(s))
	}
	for _, s := range in.Parse {
		a := parseAnswer{Input: s}
		p, err := platforms.Parse(s)
		if err != nil {
			e := err.Error()
			a.Error = &e
		} else {
			a.Platform = &p
		}
		out.Parse = append(out.Parse, a)
	}
	for _, p := range in.Normalize {
		out.Normalize = append(out.Normalize, normalizeAnswer{Input: p, Output: platforms.Normalize(p)})
	}
	for _, c := range in.Match {
		a := matchAnswer{platformCase: c}
		a.Only = platforms.Only(c.Host).Match(c.Candidate)
		a.OnlyStrict = platforms.OnlyStrict(c.Host).Match(c.Candidate)
		if c.Other != nil {
			less := platforms.Only(c.Host).Less(c.Candidate, *c.Other)
			greater := platforms.Only(c.Host).Less(*c.Other, c.Candidate)
			a.Less, a.Greater = &less, &greater
		}
		out.Match = append(out.Match, a)
	}
	for _, l := range in.Layouts {
		b := blobs(in.Blobs)
		la := layoutAnswer{Name: l.Name}
		for _, node := range l.Nodes {
			na := nodeAnswer{Node: node}
			if d, err := containerdManifest(b, l.Root, platforms.Only(node)); err != nil {
				na.Containerd.Error = err.Error()
			} else {
				na.Containerd.Digest = d
			}
			na.Crio = crioChoose(b, l.Root, node)
			la.Nodes = append(la.Nodes, na)
		}
		out.Layouts = append(out.Layouts, la)
	}
	var _ digest.Digest
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", " ")
	enc.SetEscapeHTML(false)
	if err := enc.Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, "truth:", err)
		os.Exit(1)
	}
}
